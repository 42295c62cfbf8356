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

__all__ = ["PredictionWriter", "InversionLogger", "rows"]


def rows(prediction: dict, module) -> list[dict]:
    """The per-(target, method) records of one predict_step output (no file paths)."""
    out = []
    for method, r in prediction["results"].items():
        n = len(prediction["index"])
        for b in range(n):
            out.append({
                "dataset": prediction["dataset"][b], "index": int(prediction["index"][b]),
                "label": int(prediction["label"][b]), "text": prediction["text"][b] or None,
                "method": method, "prior": module.prior_name, "encoder": module.encoder_name,
                "layer": getattr(module.encoder, "layer", None), "seed": int(module.seed),
                "final_cos": float(r.final_cos[b]), "final_l2": float(r.final_l2[b]),
                "final_rel_l2": float(r.final_rel_l2[b]), "best_cos": float(r.best_cos[b]),
                "best_l2": float(r.best_l2[b]), "nfe": int(r.nfe[b]), "backward": int(r.backward[b]),
                "nonfinite_updates": int(r.nonfinite[b]) if r.nonfinite.numel() else 0,
                "seconds": r.seconds / n, "distances": [round(float(x), 6) for x in r.distances[b]],
            })
    return out


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

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        out = self.output_dir
        records = rows(prediction, pl_module)
        target_img = prediction["target_image"]
        n = len(prediction["index"])
        paths = {}
        for b in range(n):
            stem = _stem(prediction["dataset"][b], prediction["index"][b])
            if target_img is not None:
                paths[("target", b)] = f"samples/{stem}_target.png"
                save_png(target_img[b], out / paths[("target", b)])
            for method, r in prediction["results"].items():
                paths[(method, b)] = f"samples/{stem}_{method}.png"
                save_png(r.images[b], out / paths[(method, b)])
                if self.save_best:
                    paths[(method, b, "best")] = f"samples/{stem}_{method}_best.png"
                    save_png(r.best_images[b], out / paths[(method, b, "best")])
        dataset = prediction["dataset"][0]
        grid = comparison_grid([target_img] + [r.images for r in prediction["results"].values()])
        save_png(grid, out / f"grids/{dataset}_batch{batch_idx:04d}.png")
        for rec in records:
            b = prediction["index"].index(rec["index"])
            rec["image"] = paths[(rec["method"], b)]
            rec["best_image"] = paths.get((rec["method"], b, "best"))
            rec["target_image"] = paths.get(("target", b))
        lines = "".join(json.dumps(r) + "\n" for r in records)
        path = self.results_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())


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
        dataset = outputs["dataset"][0]
        for method, r in outputs["results"].items():
            acc = self._curves[(dataset, method)]
            s = r.distances.sum(0).double()
            acc[0] = s if acc[0] is None else acc[0] + s
            acc[1] += r.distances.shape[0]
            self._scores[(dataset, method)] += list(zip(r.final_cos.tolist(), r.best_cos.tolist()))
        if self.log_grids:
            grid = comparison_grid([outputs["target_image"]] + [r.images for r in outputs["results"].values()])
            caption = "rows: " + " | ".join((["target"] if outputs["target_image"] is not None else [])
                                            + list(outputs["results"]))
            for lg in trainer.loggers:
                _log_image(lg, f"grids/{dataset}", grid, caption, batch_idx)
        if any(isinstance(lg, WandbLogger) for lg in trainer.loggers) and len(self._table) < self.max_table_rows:
            import wandb

            thumbs = {m: display(r.images) for m, r in outputs["results"].items()}
            tgt = display(outputs["target_image"]) if outputs["target_image"] is not None else None
            for rec in rows(outputs, pl_module):
                b = outputs["index"].index(rec["index"])
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
