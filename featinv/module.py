"""``InversionModule``: the thin Lightning layer; ``predict_step`` runs every configured method.

The predict loop must run with gradients on (guidance differentiates through the prior and the
encoder): the Trainer needs ``inference_mode=False`` (featinv's CLI sets it).
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch

from featinv.api import InversionResult, run_method
from featinv.encoders import Encoder
from featinv.methods import make_method, method_config
from featinv.priors import Prior
from featinv.results import digest, module_digest, tensor_digest
from featinv.specs import build_encoder, build_prior

__all__ = ["InversionModule"]

MethodSpec = str | dict[str, Any]


class InversionModule(L.LightningModule):
    """Feature inversion of each batch of targets with every method in ``methods``.

    Args:
        prior: prior spec (``zoo:digits-ddpm``, ``pixel:<id|dir>``, ``latent:<id|dir>``).
        encoder: encoder spec ``family:name[@layer][?options]`` whose feature is inverted.
        methods: preset names or dicts ``{preset, name, <field>: value}``; all share targets and seeds.
        seed: global seed; each target's noise is seeded from (seed, dataset, index).
        progress: show a progress bar over the sampling steps of the current batch.
        on_bad_target: ``raise`` (default) stops at a target whose features are NaN/inf; ``skip``
            records it in results.jsonl with ``skipped: <reason>`` and goes on.
    """

    def __init__(self, prior: str | Prior = "zoo:digits-ddpm", encoder: str | Encoder = "zoo:digits-cnn",
                 methods: list[MethodSpec] | None = None, seed: int = 0, progress: bool = True,
                 on_bad_target: str = "raise"):
        super().__init__()
        # Specs are hyperparameters; objects passed from Python are not (they hold weights).
        self.save_hyperparameters(ignore=[k for k, v in (("prior", prior), ("encoder", encoder)) if not isinstance(v, str)])
        if on_bad_target not in ("raise", "skip"):
            raise ValueError(f"model.on_bad_target must be 'raise' or 'skip', got {on_bad_target!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.methods = [make_method(m) for m in (methods or ["fast"])]
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}: give each a 'name'")
        self.prior = build_prior(prior)
        self.encoder = build_encoder(encoder)
        self.seed, self.progress, self.on_bad_target = seed, progress, on_bad_target
        self.done: dict[tuple, str] = {}  # key (dataset, index, method, seed) -> fingerprint already written

    @property
    def encoder_name(self) -> str:
        return self.hparams.get("encoder") or self.encoder.name

    @property
    def prior_name(self) -> str:
        return self.hparams.get("prior") or type(self.prior).__name__

    def identity(self) -> dict:
        """What every record of this module depends on besides its method and target."""
        return {"prior": self.prior_name, "prior_weights": module_digest(self.prior),
                "encoder": self.encoder_name, "encoder_config": self.encoder.extra_repr(),
                "encoder_weights": module_digest(self.encoder), "seed": self.seed}

    def method_configs(self) -> dict[str, dict]:
        return {m.name: method_config(m) for m in self.methods}

    def fingerprint(self, method: str, target_hash: str) -> str:
        if not hasattr(self, "_id_digest"):
            self._id_digest, self._cfg = digest(self.identity()), self.method_configs()
        return digest([self._id_digest, self._cfg[method], target_hash])

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled() or self.trainer.predict_loop.inference_mode:
            raise RuntimeError("featinv needs gradients during predict, but the Trainer runs predict in "
                               "inference mode: create it with Trainer(inference_mode=False) "
                               "(featinv's CLI and configs do this by default)")

    def targets(self, batch: dict) -> torch.Tensor:
        """The batch's target features (B, D): given, or encoded from images / text."""
        if batch["feature"].numel():
            return batch["feature"].float()
        if batch["image"].numel():
            with torch.no_grad():
                return self.encoder(batch["image"].float())
        if any(batch["text"]):
            encode_text = getattr(self.encoder, "encode_text", None)
            if encode_text is None:
                raise ValueError(f"text targets need an encoder with a text tower (clip:...); "
                                 f"{self.encoder_name!r} has none")
            with torch.no_grad():
                return encode_text(list(batch["text"])).float()
        raise ValueError("batch has no image, feature or text target")

    @staticmethod
    def target_hashes(batch: dict) -> list[str]:
        """Content hash of each target (its feature row, image or text)."""
        n = len(batch["index"])
        for k in ("feature", "image"):
            if batch[k].numel():
                return [tensor_digest(batch[k][b]) for b in range(n)]
        return [tensor_digest(str(t)) for t in batch["text"]]

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Run every method on the batch's targets whose record is missing or stale.

        Returns the batch's metadata, ``results[method] = (positions, InversionResult)`` (the
        positions in the batch that the method ran on), ``skipped = {position: reason}`` and
        ``fingerprints[method][position]``.
        """
        keys = list(zip(batch["dataset"], batch["index"].tolist()))
        hashes = self.target_hashes(batch)
        fps = {m.name: [self.fingerprint(m.name, h) for h in hashes] for m in self.methods}
        show = self.progress and self.global_rank == 0
        results: dict[str, tuple[list[int], InversionResult]] = {}
        skipped: dict[int, str] = {}
        todo = {m.name: [b for b, (d, i) in enumerate(keys) if self.done.get((d, i, m.name, self.seed)) != fps[m.name][b]]
                for m in self.methods}
        if any(todo.values()):
            with torch.enable_grad():
                target = self.targets(batch)
                bad = (~torch.isfinite(target).all(dim=1)).nonzero().flatten().tolist()
                if bad and self.on_bad_target == "raise":
                    raise ValueError(f"target features contain NaN/inf for {[keys[b] for b in bad][:10]}; set "
                                     "model.on_bad_target=skip to record and skip such targets")
                skipped = {b: "target features contain NaN/inf" for b in bad}
                todo = {m: [b for b in pos if b not in skipped] for m, pos in todo.items()}
                cond = self.prior.encode_prompt(list(batch["prompt"])) if any(batch.get("prompt", [])) else None
                for m in self.methods:
                    pos = todo[m.name]
                    if pos:  # per-target seeds: a subset gives the same results as the whole batch
                        results[m.name] = (pos, run_method(m, self.prior, self.encoder, target[pos],
                                                           [keys[b] for b in pos], seed=self.seed, progress=show,
                                                           cond=cond[pos] if cond is not None else None))
        image = batch["image"].detach().cpu() if batch["image"].numel() else None
        return {"dataset": list(batch["dataset"]), "index": batch["index"].tolist(),
                "label": batch["label"].tolist(), "text": list(batch["text"]), "target_image": image,
                "results": results, "skipped": skipped, "fingerprints": fps}
