"""Output contract and logging, as Lightning callbacks, for every ``featinv.harness.AnalysisModule``.

``PredictionWriter`` owns the output directory (``featinv.results``): it locks it, checks that it
was written by the same configuration, folds in rank files a failed multi-process run left, and
writes each batch's records and PNGs as the batch finishes. ``RunLogger`` sends each batch's
running-mean curves, grids, table rows, extra tables/plots and running means to the Trainer's
loggers (W&B, TensorBoard, CSV), and at the end the summary over every record of the directory.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import Logger, WandbLogger

from featinv import results as R
from featinv.viz import save_png

__all__ = ["PredictionWriter", "RunLogger", "summary_means", "mean_curves"]


class PredictionWriter(BasePredictionWriter):
    """Writes the output contract under ``output_dir`` as each batch finishes.

    ``new_run``: if the directory holds another configuration's results, write to a new
    ``<output_dir>/run-<n>`` instead of refusing. ``skip_corrupt``: skip (and report) corrupt lines
    of an existing results file instead of refusing. Several ranks write ``results.rank<k>.jsonl``,
    merged by rank 0 at the end (and at the start of the next run, if a run died).
    """

    def __init__(self, output_dir: str | os.PathLike, new_run: bool = False, skip_corrupt: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir, self.new_run, self.skip_corrupt = Path(output_dir), new_run, skip_corrupt
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
        for rel, img in {**prediction.get("images", {}), **prediction.get("grids", {})}.items():
            save_png(img, self.output_dir / rel)
        for name, fig in prediction.get("plots", {}).items():
            path = self.output_dir / "plots" / f"{name.replace('/', '_')}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=100, bbox_inches="tight")
        R.append_records(self.results_path(trainer), prediction.get("records", []))

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


TABLE_SKIP = ("distances", "fingerprint", "prior", "encoder", "image", "best_image", "target_image", "text")


class RunLogger(Callback):
    """Logs an analysis run to the Trainer's loggers, batch by batch (see the module docstring).

    W&B: per batch a line chart of each (dataset, method)'s running-mean per-step curve over
    ``guidance/step`` (``curves/...``), the grids, the batch's rows in an incremental ``results``
    table (thumbnails of the images), any extra tables and plots, and running means under
    ``running/...``; at the end the mean curves as history on the ``guidance/step`` axis and the
    summary (means and counts per dataset and method) over every record of the output directory
    (all ranks, earlier resumed runs included). Other loggers get curves and means via ``log_metrics``.
    """

    def __init__(self, output_dir: str | os.PathLike | None = None, max_table_rows: int = 2000, log_grids: bool = True):
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.max_table_rows, self.log_grids = max_table_rows, log_grids

    def on_predict_start(self, trainer, pl_module):
        self._curves = defaultdict(lambda: [None, 0])  # (dataset, method) -> [sum of curves, count]
        self._records: list[dict] = []
        self._rows, self._batches, self._table = 0, 0, None

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        recs = [r for r in outputs.get("records", []) if "skipped" not in r]
        if not trainer.loggers or not (recs or outputs.get("tables") or outputs.get("plots")):
            return
        self._batches += 1
        self._records += recs
        curves = {}
        for (dataset, method), c in outputs.get("curves", {}).items():
            acc, s = self._curves[(dataset, method)], c.sum(0).double()
            if acc[0] is None or len(acc[0]) == len(s):
                acc[0], acc[1] = (s if acc[0] is None else acc[0] + s), acc[1] + c.shape[0]
                curves[f"curves/{dataset}/{method}"] = (acc[0] / acc[1]).tolist()
        means = {f"running/{k}": v for k, v in summary_means(self._records).items() if not k.startswith("n/")}
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                self._log_wandb_batch(lg, outputs, recs, curves, means)
            else:
                lg.log_metrics(means, step=self._batches)
                if self.log_grids:
                    for rel, grid in outputs.get("grids", {}).items():
                        _log_image(lg, Path(rel).stem, grid, self._batches)

    def _log_wandb_batch(self, lg: WandbLogger, outputs, recs, curves, means):
        import wandb

        run = lg.experiment
        run.define_metric("predict/batch")
        run.define_metric("running/*", step_metric="predict/batch")
        payload = {"predict/batch": self._batches, **means}
        for key, c in curves.items():  # the running mean curve, redrawn each batch
            table = wandb.Table(data=[[i, v] for i, v in enumerate(c)], columns=["guidance/step", "distance"])
            payload[key] = wandb.plot.line(table, "guidance/step", "distance", title=key)
        if self.log_grids:
            for rel, grid in outputs.get("grids", {}).items():
                payload[f"grids/{Path(rel).stem.rsplit('_', 1)[0]}"] = wandb.Image(grid, caption=outputs.get("grid_caption"))
        for name, (cols, rows) in outputs.get("tables", {}).items():
            payload[f"tables/{name}"] = wandb.Table(columns=list(cols), data=[list(r) for r in rows])
        for name, fig in outputs.get("plots", {}).items():
            payload[f"plots/{name}"] = wandb.Image(fig)
        if recs and self._rows < self.max_table_rows:
            cols = [k for k in recs[0] if k not in TABLE_SKIP and isinstance(recs[0][k], (str, int, float, type(None)))]
            if self._table is None:
                self._columns = cols
                self._table = wandb.Table(columns=cols + ["target", "output"], log_mode="INCREMENTAL")
            images = outputs.get("images", {})
            for rec in recs:
                thumbs = [wandb.Image(images[rec[k]]) if rec.get(k) in images else None for k in ("target_image", "image")]
                self._table.add_data(*[rec.get(c) for c in self._columns], *thumbs)
                self._rows += 1
            payload["results"] = self._table
        run.log(payload)

    def on_predict_end(self, trainer, pl_module):
        """Rank 0: mean curves and the summary over every record of the output directory (after the merge)."""
        if not trainer.loggers or not trainer.is_global_zero:
            return
        out = self.output_dir or _writer_dir(trainer)
        records = list(R.latest(R.read_dir(out)).values()) if out is not None else self._records
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


def summary_means(records: list[dict]) -> dict[str, float]:
    """Mean of every numeric field (final_cos, best_cos, eval/... scores, ...) and the record count
    per (dataset, method), over non-skipped records; keys ``<field>/<dataset>/<method>``, and
    ``<field>/<dataset>/all`` over every method (a sweep's metric, one method per run)."""
    groups = defaultdict(list)
    for r in records:
        if "skipped" not in r:
            groups[(r["dataset"], r["method"])].append(r)
            groups[(r["dataset"], "all")].append(r)
    out = {}
    for (d, m), rs in groups.items():
        out[f"n/{d}/{m}"] = len(rs)
        fields = {k for r in rs for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k in sorted(fields - {"index", "label", "seed"}):
            vals = [r[k] for r in rs if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if vals:
                out[f"{k}/{d}/{m}"] = sum(vals) / len(vals)
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


def _log_image(lg: Logger, key: str, grid: torch.Tensor, step: int) -> None:
    if hasattr(getattr(lg, "experiment", None), "add_image"):  # TensorBoard
        lg.experiment.add_image(key, grid, global_step=step)
