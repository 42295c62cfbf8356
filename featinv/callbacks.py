"""Output contract and logging, as Lightning callbacks.

``PredictionWriter`` owns the output directory (``featinv.results``): it locks it, checks that it
was written by the same configuration, folds in rank files a failed multi-process run left, and
writes records, PNGs and a grid per batch as each batch finishes. ``InversionLogger`` sends each
batch's curves, grid, table rows and running means to the Trainer's loggers (W&B, TensorBoard,
CSV) as it finishes, and at the end the summary over every record of the directory.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import Logger, WandbLogger

from featinv import results as R
from featinv.viz import comparison_grid, display, save_png

__all__ = ["PredictionWriter", "InversionLogger", "rows"]


def rows(prediction: dict, module) -> list[dict]:
    """The records of one predict_step output (paths not yet set); ``_pos`` = position in the batch."""
    out = []
    for method, (positions, r) in prediction["results"].items():
        share = r.seconds / len(positions)
        for j, b in enumerate(positions):
            out.append({
                "dataset": prediction["dataset"][b], "index": int(prediction["index"][b]),
                "label": int(prediction["label"][b]), "text": prediction["text"][b] or None,
                "method": method, "prior": module.prior_name, "encoder": module.encoder_name,
                "layer": getattr(module.encoder, "layer", None), "seed": int(module.seed),
                "fingerprint": prediction["fingerprints"][method][b],
                "final_cos": float(r.final_cos[j]), "final_l2": float(r.final_l2[j]),
                "final_rel_l2": float(r.final_rel_l2[j]), "best_cos": float(r.best_cos[j]),
                "best_l2": float(r.best_l2[j]), "nfe": int(r.nfe[j]), "backward": int(r.backward[j]),
                "nonfinite_updates": int(r.nonfinite[j]) if r.nonfinite.numel() else 0,
                "seconds": share, "distances": [round(float(x), 6) for x in r.distances[j]], "_pos": b,
            })
    return out


def skipped_records(prediction: dict, module) -> list[dict]:
    """Records of targets that were not inverted (``on_bad_target: skip``), for stale keys only."""
    out = []
    for b, why in prediction.get("skipped", {}).items():
        d, i = prediction["dataset"][b], int(prediction["index"][b])
        for m in module.methods:
            fp = prediction["fingerprints"][m.name][b]
            if module.done.get((d, i, m.name, module.seed)) != fp:
                out.append({"dataset": d, "index": i, "label": int(prediction["label"][b]), "method": m.name,
                            "prior": module.prior_name, "encoder": module.encoder_name, "seed": int(module.seed),
                            "fingerprint": fp, "skipped": why})
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


def grid_path(prediction: dict) -> str:
    """grids/<dataset>_<first index>.png: unique across ranks and stable across resumes."""
    return f"{R.GRIDS}/{prediction['dataset'][0]}_{int(prediction['index'][0]):06d}.png"


class PredictionWriter(BasePredictionWriter):
    """Writes the output contract under ``output_dir`` as each batch finishes.

    ``new_run``: if the directory holds another configuration's results, write to a new
    ``<output_dir>/run-<n>`` instead of refusing. ``skip_corrupt``: skip (and report) corrupt lines
    of an existing results file instead of refusing. Several ranks write ``results.rank<k>.jsonl``,
    merged by rank 0 at the end (and at the start of the next run, if a run died).
    """

    def __init__(self, output_dir: str | os.PathLike, save_best: bool = True, new_run: bool = False,
                 skip_corrupt: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir, self.save_best = Path(output_dir), save_best
        self.new_run, self.skip_corrupt = new_run, skip_corrupt
        self._lock: R.OutputDirLock | None = None

    def results_path(self, trainer) -> Path:
        name = R.RESULTS if trainer.world_size == 1 else f"results.rank{trainer.global_rank}.jsonl"
        return self.output_dir / name

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Rank 0: lock the directory, check the configuration, fold in leftover rank files."""
        if trainer.is_global_zero:
            self._lock = R.OutputDirLock(self.output_dir).acquire()
            try:
                self.output_dir = R.check_run(self.output_dir, pl_module.identity(), pl_module.method_configs(),
                                              new_run=self.new_run)
                R.read_dir(self.output_dir, repair=True, skip_corrupt=self.skip_corrupt)
                R.merge_rank_files(self.output_dir)
            except BaseException:
                self._release()
                raise
        if trainer.world_size > 1:
            self.output_dir = Path(trainer.strategy.broadcast(str(self.output_dir), src=0))
            trainer.strategy.barrier("featinv-setup")

    def on_predict_start(self, trainer, pl_module):
        """Resume: records whose key and fingerprint are already in the directory are skipped."""
        pl_module.done = {R.record_key(r): r.get("fingerprint")
                          for r in R.read_dir(self.output_dir, skip_corrupt=self.skip_corrupt)}
        if pl_module.done and trainer.is_global_zero:
            print(f"featinv: resuming in {self.output_dir}: {len(pl_module.done)} records are there; "
                  "those with the same fingerprint are skipped")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        out = self.output_dir
        target_img = prediction["target_image"]
        records = rows(prediction, pl_module)
        for rec in records:
            b = rec.pop("_pos")
            positions, r = prediction["results"][rec["method"]]
            j = positions.index(b)
            rec["image"] = R.sample_path(rec["dataset"], rec["index"], rec["method"])
            save_png(r.images[j], out / rec["image"])
            rec["best_image"] = R.sample_path(rec["dataset"], rec["index"], rec["method"], "_best") \
                if self.save_best else None
            if self.save_best:
                save_png(r.best_images[j], out / rec["best_image"])
            rec["target_image"] = R.sample_path(rec["dataset"], rec["index"], "target") if target_img is not None else None
            if target_img is not None:
                save_png(target_img[b], out / rec["target_image"])
        if prediction["results"]:
            save_png(batch_grid(prediction), out / grid_path(prediction))
        R.append_records(self.results_path(trainer), records + skipped_records(prediction, pl_module))

    def on_predict_end(self, trainer, pl_module):
        """Rank 0 folds the rank files into results.jsonl and keeps one record per key."""
        if trainer.world_size > 1:
            trainer.strategy.barrier("featinv-merge")
        if trainer.is_global_zero:
            R.merge_rank_files(self.output_dir) if trainer.world_size > 1 else R.compact(self.output_dir)
        if trainer.world_size > 1:
            trainer.strategy.barrier("featinv-merged")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._release()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class InversionLogger(Callback):
    """Logs inversion runs to the Trainer's loggers, batch by batch.

    Per batch: the running mean distance curve per (dataset, method) (W&B: a line chart over
    ``guidance/step``), the comparison grid, the batch's table rows with thumbnails and running
    means. At the end (rank 0): the summary over every record in the output directory (all ranks,
    earlier resumed runs included). Other loggers get the curves and means through ``log_metrics``.
    """

    def __init__(self, output_dir: str | os.PathLike | None = None, max_table_rows: int = 2000, log_grids: bool = True):
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.max_table_rows, self.log_grids = max_table_rows, log_grids

    def on_predict_start(self, trainer, pl_module):
        self._curves = defaultdict(lambda: [None, 0])  # (dataset, method) -> [sum of curves, count]
        self._rows = 0
        self._batches = 0
        self._table = None

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.loggers or not outputs["results"]:
            return
        dataset = outputs["dataset"][0]
        self._batches += 1
        curves = {}
        for method, (_, r) in outputs["results"].items():
            acc = self._curves[(dataset, method)]
            s = r.distances.sum(0).double()
            acc[0] = s if acc[0] is None else acc[0] + s
            acc[1] += r.distances.shape[0]
            curves[f"curves/{dataset}/{method}"] = (acc[0] / acc[1]).tolist()
        recs = rows(outputs, pl_module)
        means = {f"running/final_cos/{dataset}/{m}": float(r.final_cos.mean()) for m, (_, r) in outputs["results"].items()}
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                self._log_wandb_batch(lg, outputs, recs, curves, means)
            else:
                lg.log_metrics(means, step=self._batches)
                if self.log_grids:
                    _log_image(lg, f"grids/{dataset}", batch_grid(outputs), "", self._batches)

    def _log_wandb_batch(self, lg: WandbLogger, outputs, recs, curves, means):
        import wandb

        run = lg.experiment
        run.define_metric("predict/batch")
        run.define_metric("running/*", step_metric="predict/batch")
        payload = {"predict/batch": self._batches, **means}
        for key, c in curves.items():  # the running mean distance curve, redrawn each batch
            payload[key] = wandb.plot.line(wandb.Table(data=[[i, v] for i, v in enumerate(c)],
                                                       columns=["guidance/step", "distance"]),
                                           "guidance/step", "distance", title=key)
        if self.log_grids:
            caption = "rows: " + " | ".join((["target"] if outputs["target_image"] is not None else [])
                                            + list(outputs["results"]))
            payload[f"grids/{outputs['dataset'][0]}"] = wandb.Image(batch_grid(outputs), caption=caption)
        if self._rows < self.max_table_rows:
            if self._table is None:
                self._table = wandb.Table(columns=TABLE_COLUMNS + ["target", "inversion"], log_mode="INCREMENTAL")
            thumbs = {m: display(method_images(outputs, m)) for m in outputs["results"]}
            tgt = display(outputs["target_image"]) if outputs["target_image"] is not None else None
            for rec in recs:
                b = rec["_pos"]
                self._table.add_data(*[rec.get(c) for c in TABLE_COLUMNS],
                                     wandb.Image(tgt[b]) if tgt is not None else None,
                                     wandb.Image(thumbs[rec["method"]][b]))
                self._rows += 1
            payload["results"] = self._table
        run.log(payload)

    def on_predict_end(self, trainer, pl_module):
        """Rank 0: the summary over every record of the output directory (after the merge)."""
        if not trainer.loggers or not trainer.is_global_zero:
            return
        out = self.output_dir or _writer_dir(trainer)
        records = list(R.latest(R.read_dir(out)).values()) if out is not None else []
        means, curves = summary_means(records), mean_curves(records)
        n = max((len(c) for c in curves.values()), default=0)
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                run = lg.experiment
                run.define_metric("guidance/step")
                run.define_metric("distance/*", step_metric="guidance/step")
                for i in range(n):
                    run.log({"guidance/step": i, **{k: c[i] for k, c in curves.items() if i < len(c)}})
                for k, v in means.items():
                    run.summary[k] = v
            else:
                for i in range(n):
                    lg.log_metrics({k: c[i] for k, c in curves.items() if i < len(c)}, step=i)
                lg.log_metrics(means, step=n)
            lg.save()


TABLE_COLUMNS = ["dataset", "index", "label", "method", "final_cos", "best_cos", "final_l2", "nfe"]


def summary_means(records: list[dict]) -> dict[str, float]:
    """final_cos / best_cos means and record counts per (dataset, method), skipped records excluded."""
    groups = defaultdict(list)
    for r in records:
        if "skipped" not in r and r.get("final_cos") is not None:
            groups[(r["dataset"], r["method"])].append(r)
    out = {}
    for (d, m), rs in groups.items():
        out[f"final_cos/{d}/{m}"] = sum(r["final_cos"] for r in rs) / len(rs)
        out[f"best_cos/{d}/{m}"] = sum(r["best_cos"] for r in rs) / len(rs)
        out[f"n/{d}/{m}"] = len(rs)
    return out


def mean_curves(records: list[dict]) -> dict[str, list[float]]:
    """The mean per-step distance curve per (dataset, method), over records of equal length."""
    groups = defaultdict(list)
    for r in records:
        if r.get("distances") and None not in r["distances"]:
            groups[(r["dataset"], r["method"])].append(r["distances"])
    out = {}
    for (d, m), cs in groups.items():
        n = min(len(c) for c in cs)
        out[f"distance/{d}/{m}"] = [sum(c[i] for c in cs) / len(cs) for i in range(n)]
    return out


def _writer_dir(trainer) -> Path | None:
    for cb in trainer.callbacks:
        if isinstance(cb, PredictionWriter):
            return cb.output_dir
    return None


def _log_image(lg: Logger, key: str, grid: torch.Tensor, caption: str, step: int) -> None:
    if hasattr(getattr(lg, "experiment", None), "add_image"):  # TensorBoard
        lg.experiment.add_image(key, grid, global_step=step)
