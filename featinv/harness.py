"""``AnalysisModule``: what every featinv LightningModule shares with the writer and the logger.

Inversion (``featinv.module.InversionModule``) and the model-level explainers (DEPICT, DiffEx,
EDDP, DEXTER under ``featinv.explain``) are all analyses run by ``featinv predict`` in predict
loops. Each ``predict_step`` returns a *prediction*::

    {"records": [dict, ...],          # one per (dataset, index, method, seed), fingerprint included
     "images":  {relpath: (C,H,W)},   # PNGs to write under the output directory
     "grids":   {relpath: (3,H,W)},   # comparison grids (also logged to W&B)
     "tables":  {name: (columns, rows)},  # optional extra W&B tables
     "plots":   {name: figure},       # optional matplotlib figures (W&B + PNG)
     "curves":  {(dataset, method): (B, S) tensor}}  # optional per-step curves (running means)

``PredictionWriter`` writes records and images; ``RunLogger`` logs them (featinv.callbacks).
A module says what determines its records (``identity``, ``method_configs``); resume skips a key
whose fingerprint is in ``self.done``.
"""
from __future__ import annotations

import lightning as L
import torch

from featinv.results import digest, tensor_digest

__all__ = ["AnalysisModule"]


class AnalysisModule(L.LightningModule):
    """Base class of featinv's LightningModules (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.done: dict[tuple, str] = {}  # key (dataset, index, method, seed) -> fingerprint on disk

    def identity(self) -> dict:
        """Everything (besides a method's configuration and the target) that determines a record."""
        raise NotImplementedError

    def method_configs(self) -> dict[str, dict]:
        """name -> full configuration of each method this module runs."""
        raise NotImplementedError

    def fingerprint(self, method: str, target_hash: str) -> str:
        if not hasattr(self, "_id_digest"):
            self._id_digest, self._cfg = digest(self.identity()), self.method_configs()
        return digest([self._id_digest, self._cfg[method], target_hash])

    def is_done(self, key: tuple, fingerprint: str) -> bool:
        return self.done.get(key) == fingerprint

    @staticmethod
    def target_hashes(batch: dict) -> list[str]:
        """Content hash of each target of a batch (its feature row, image, or text and prompt)."""
        n = len(batch["index"])
        for k in ("feature", "image"):
            if isinstance(batch.get(k), torch.Tensor) and batch[k].numel():
                return [tensor_digest(batch[k][b]) for b in range(n)]
        texts, prompts = batch.get("text", [""] * n), batch.get("prompt", [""] * n)
        return [tensor_digest(f"{texts[b]}\x00{prompts[b]}") for b in range(n)]

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled() or self.trainer.predict_loop.inference_mode:
            raise RuntimeError("featinv needs gradients during predict, but the Trainer runs predict in "
                               "inference mode: create it with Trainer(inference_mode=False) "
                               "(featinv's CLI and configs do this by default)")
