"""Output contract and logging, as Lightning callbacks.

``PredictionWriter`` writes ``results.jsonl`` (one line per target and method), result/target PNGs
and a comparison grid per batch, as each batch finishes. ``InversionLogger`` sends per-step distance
curves, grids, a per-target table and summaries to the Trainer's logger (W&B, TensorBoard, CSV).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import Logger, WandbLogger

from featinv.viz import comparison_grid, display, save_png

__all__ = ["PredictionWriter", "InversionLogger", "rows", "read_done", "merge_results"]


def rows(prediction: dict, module) -> list[dict]:
    """The per-(target, method) records of one predict_step output (no file paths yet).

    Each record carries ``_pos``, its position in the batch (dropped before writing).
    """
    out = []
    for method, (positions, r) in prediction["results"].items():
        share = r.seconds / len(positions)
        for j, b in enumerate(positions):
            out.append({
                "dataset": prediction["dataset"][b], "index": int(prediction["index"][b]),
                "label": int(prediction["label"][b]), "text": prediction["text"][b] or None,
                "method": method, "prior": module.prior_name, "encoder": module.encoder_name,
                "layer": getattr(module.encoder, "layer", None), "seed": int(module.seed),
                "final_cos": float(r.final_cos[j]), "final_l2": float(r.final_l2[j]),
                "final_rel_l2": float(r.final_rel_l2[j]), "best_cos": float(r.best_cos[j]),
                "best_l2": float(r.best_l2[j]), "nfe": int(r.nfe[j]), "backward": int(r.backward[j]),
                "nonfinite_updates": int(r.nonfinite[j]) if r.nonfinite.numel() else 0,
                "seconds": share, "distances": [round(float(x), 6) for x in r.distances[j]], "_pos": b,
            })
    return out


def method_images(prediction: dict, method: str, best: bool = False) -> torch.Tensor:
    """(B, C, H, W) images of one method for the whole batch; white where it did not run (resumed)."""
    positions, r = prediction["results"][method]
    imgs = r.best_images if best else r.images
    if len(positions) == len(prediction["index"]):
        return imgs
    full = torch.ones(len(prediction["index"]), *imgs.shape[1:])
    full[positions] = imgs
    return full


def batch_grid(prediction: dict) -> torch.Tensor:
    """Targets (if images) over each method's results."""
    return comparison_grid([prediction["target_image"]] + [method_images(prediction, m) for m in prediction["results"]])


def read_done(output_dir: Path) -> set[tuple[str, int, str, int]]:
    """(dataset, index, method, seed) of every record already in output_dir's results files.

    A torn last line (a run killed mid-write) is cut off so that appends stay whole lines.
    """
    done = set()
    for path in sorted(output_dir.glob("results*.jsonl")):
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            path.write_bytes(data)
        for line in data.decode().splitlines():
            r = json.loads(line)
            done.add((r["dataset"], int(r["index"]), r["method"], int(r["seed"])))
    return done


def skipped_record(prediction: dict, b: int, method: str, reason: str, module) -> dict:
    """The record of a target that was not inverted (``on_bad_target: skip``)."""
    return {"dataset": prediction["dataset"][b], "index": int(prediction["index"][b]),
            "label": int(prediction["label"][b]), "method": method, "prior": module.prior_name,
            "encoder": module.encoder_name, "seed": int(module.seed), "skipped": reason}


def _stem(dataset: str, index: int) -> str:
    return f"{dataset}/{index:06d}"


class PredictionWriter(BasePredictionWriter):
    """Writes the output contract under ``output_dir`` as each batch finishes (DESIGN.md).

    Lines are appended whole, flushed and fsync'ed; under several ranks each rank writes
    ``results.rank<k>.jsonl``.
    """

    def __init__(self, output_dir: str | os.PathLike, save_best: bool = True):
        super().__init__(write_interval="batch")
        self.output_dir, self.save_best = Path(output_dir), save_best

    def results_path(self, trainer) -> Path:
        name = "results.jsonl" if trainer.world_size == 1 else f"results.rank{trainer.global_rank}.jsonl"
        return self.output_dir / name

    def on_predict_start(self, trainer, pl_module):
        """Resume: targets already in the results files are skipped (same dataset, index, method, seed)."""
        pl_module.done = read_done(self.output_dir) if self.output_dir.exists() else set()
        if pl_module.done and trainer.is_global_zero:
            print(f"featinv: resuming in {self.output_dir}: {len(pl_module.done)} records already written are skipped")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        out = self.output_dir
        target_img = prediction["target_image"]
        records = rows(prediction, pl_module)
        lines = [skipped_record(prediction, b, m.name, why, pl_module) for b, why in prediction.get("skipped", {}).items()
                 for m in pl_module.methods
                 if (prediction["dataset"][b], prediction["index"][b], m.name, pl_module.seed) not in pl_module.done]
        for rec in records:
            b, stem = rec.pop("_pos"), _stem(rec["dataset"], rec["index"])
            positions, r = prediction["results"][rec["method"]]
            j = positions.index(b)
            rec["image"] = f"samples/{stem}_{rec['method']}.png"
            save_png(r.images[j], out / rec["image"])
            rec["best_image"] = f"samples/{stem}_{rec['method']}_best.png" if self.save_best else None
            if self.save_best:
                save_png(r.best_images[j], out / rec["best_image"])
            rec["target_image"] = f"samples/{stem}_target.png" if target_img is not None else None
            if target_img is not None:
                save_png(target_img[b], out / rec["target_image"])
        if prediction["results"]:
            save_png(batch_grid(prediction), out / f"grids/{prediction['dataset'][0]}_batch{batch_idx:04d}.png")
        if not records and not lines:
            return
        lines = "".join(json.dumps(r) + "\n" for r in records + lines)
        path = self.results_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def on_predict_end(self, trainer, pl_module):
        """Several ranks: rank 0 merges the per-rank files into results.jsonl, one line per record."""
        if trainer.world_size == 1:
            return
        trainer.strategy.barrier("featinv-merge")
        if trainer.is_global_zero:
            merge_results(self.output_dir)
        trainer.strategy.barrier("featinv-merged")


def merge_results(output_dir: Path) -> int:
    """Fold results.rank*.jsonl into results.jsonl, dropping duplicate records; returns the count."""
    main = output_dir / "results.jsonl"
    read_done(output_dir)  # cuts torn last lines
    seen = _keys(main) if main.exists() else set()
    lines = []
    for part in sorted(output_dir.glob("results.rank*.jsonl")):
        for line in part.read_text().splitlines():
            r = json.loads(line)
            key = (r["dataset"], int(r["index"]), r["method"], int(r["seed"]))
            if key not in seen:
                seen.add(key)
                lines.append(line + "\n")
    with open(main, "a") as f:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    for part in output_dir.glob("results.rank*.jsonl"):
        part.unlink()
    return len(seen)


def _keys(path: Path) -> set:
    return {(r["dataset"], int(r["index"]), r["method"], int(r["seed"]))
            for r in map(json.loads, path.read_text().splitlines())}


class InversionLogger(Callback):
    """Logs inversion runs to the Trainer's logger.

    W&B: per-step mean distance per (dataset, method) against the custom x-axis ``guidance/step``
    (never the diffusion timestep), a comparison grid per batch, a ``wandb.Table`` of per-target
    results with thumbnails, and mean final/best cosine per (dataset, method) in the run summary.
    Other loggers get the curves and means through ``log_metrics`` (TensorBoard also the grids).
    """

    def __init__(self, max_table_rows: int = 2000, log_grids: bool = True):
        self.max_table_rows, self.log_grids = max_table_rows, log_grids

    def on_predict_start(self, trainer, pl_module):
        self._curves = defaultdict(lambda: [None, 0])  # (dataset, method) -> [sum of curves, count]
        self._scores = defaultdict(list)  # (dataset, method) -> [(final_cos, best_cos)]
        self._table = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.loggers:
            return
        if not outputs["results"]:
            return
        dataset = outputs["dataset"][0]
        for method, (_, r) in outputs["results"].items():
            acc = self._curves[(dataset, method)]
            s = r.distances.sum(0).double()
            acc[0] = s if acc[0] is None else acc[0] + s
            acc[1] += r.distances.shape[0]
            self._scores[(dataset, method)] += list(zip(r.final_cos.tolist(), r.best_cos.tolist()))
        if self.log_grids:
            grid = batch_grid(outputs)
            caption = "rows: " + " | ".join((["target"] if outputs["target_image"] is not None else [])
                                            + list(outputs["results"]))
            for lg in trainer.loggers:
                _log_image(lg, f"grids/{dataset}", grid, caption, batch_idx)
        if any(isinstance(lg, WandbLogger) for lg in trainer.loggers) and len(self._table) < self.max_table_rows:
            import wandb

            thumbs = {m: display(method_images(outputs, m)) for m in outputs["results"]}
            tgt = display(outputs["target_image"]) if outputs["target_image"] is not None else None
            for rec in rows(outputs, pl_module):
                b = rec["_pos"]
                self._table.append([rec["dataset"], rec["index"], rec["label"], rec["method"], rec["final_cos"],
                                    rec["best_cos"], rec["final_l2"], rec["nfe"],
                                    wandb.Image(tgt[b]) if tgt is not None else None,
                                    wandb.Image(thumbs[rec["method"]][b])])

    def on_predict_end(self, trainer, pl_module):
        if not trainer.loggers or not trainer.is_global_zero:
            return
        curves = {f"distance/{d}/{m}": (s / n).tolist() for (d, m), (s, n) in self._curves.items()}
        means = {}
        for (d, m), v in self._scores.items():
            t = torch.tensor(v)
            means[f"final_cos/{d}/{m}"] = float(t[:, 0].mean())
            means[f"best_cos/{d}/{m}"] = float(t[:, 1].mean())
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                self._log_wandb(lg, curves, means)
            else:
                for i in range(max((len(c) for c in curves.values()), default=0)):
                    lg.log_metrics({k: c[i] for k, c in curves.items() if i < len(c)}, step=i)
                lg.log_metrics(means, step=0)
            lg.save()

    def _log_wandb(self, lg: WandbLogger, curves: dict, means: dict):
        import wandb

        run = lg.experiment
        run.define_metric("guidance/step")
        run.define_metric("distance/*", step_metric="guidance/step")
        for i in range(max((len(c) for c in curves.values()), default=0)):
            run.log({"guidance/step": i, **{k: c[i] for k, c in curves.items() if i < len(c)}})
        if self._table:
            cols = ["dataset", "index", "label", "method", "final_cos", "best_cos", "final_l2", "nfe", "target",
                    "inversion"]
            run.log({"results": wandb.Table(columns=cols, data=self._table)})
        run.log(means)
        for k, v in means.items():
            run.summary[k] = v


def _log_image(lg: Logger, key: str, grid: torch.Tensor, caption: str, step: int) -> None:
    if isinstance(lg, WandbLogger):
        lg.log_image(key=key, images=[grid], caption=[caption])
    elif hasattr(getattr(lg, "experiment", None), "add_image"):  # TensorBoard
        lg.experiment.add_image(key, grid, global_step=step)
