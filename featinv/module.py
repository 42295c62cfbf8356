"""``InversionModule``: the thin Lightning layer; ``predict_step`` runs every configured method.

The predict loop must run with gradients on (guidance differentiates through the prior and the
encoder): the Trainer needs ``inference_mode=False`` (featinv's CLI sets it).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featinv import results as R
from featinv.api import InversionResult, run_method
from featinv.encoders import Encoder
from featinv.evaluators import build_evaluator, evaluate
from featinv.harness import AnalysisModule
from featinv.methods import make_method, method_config
from featinv.priors import Prior
from featinv.results import module_digest
from featinv.specs import build_encoder, build_prior
from featinv.viz import comparison_grid

__all__ = ["InversionModule"]

MethodSpec = str | dict[str, Any]


class InversionModule(AnalysisModule):
    """Feature inversion of each batch of targets with every method in ``methods``.

    Args:
        prior: prior spec (``zoo:digits-ddpm``, ``pixel:<id|dir>``, ``latent:<id|dir>``).
        encoder: encoder spec ``family:name[@layer][?options]`` whose feature is inverted.
        methods: preset names or dicts ``{preset, name, <field>: value}``; all share targets and seeds.
        evaluators: encoder or reader specs that never guide and score every output (held-out
            cosine, label agreement, per-factor agreement; ``featinv.evaluators``).
        seed: global seed; each target's noise is seeded from (seed, dataset, index).
        progress: show a progress bar over the sampling steps of the current batch.
        on_bad_target: ``raise`` (default) stops at a target whose features are NaN/inf; ``skip``
            records it in results.jsonl with ``skipped: <reason>`` and goes on.
        save_best: also write each method's best-along-the-trajectory image.
    """

    def __init__(self, prior: str | Prior = "zoo:digits-ddpm", encoder: str | Encoder = "zoo:digits-cnn",
                 methods: list[MethodSpec] | None = None, evaluators: list[str] | None = None, seed: int = 0,
                 progress: bool = True, on_bad_target: str = "raise", save_best: bool = True):
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
        self.evaluators = [build_evaluator(e) for e in (evaluators or [])]
        self.evaluator_models = nn.ModuleList([m for e in self.evaluators for m in vars(e).values()
                                               if isinstance(m, nn.Module)])  # moved to the device with us
        self.seed, self.progress, self.on_bad_target, self.save_best = seed, progress, on_bad_target, save_best

    @property
    def encoder_name(self) -> str:
        return self.hparams.get("encoder") or self.encoder.name

    @property
    def prior_name(self) -> str:
        return self.hparams.get("prior") or type(self.prior).__name__

    def identity(self) -> dict:
        return {"prior": self.prior_name, "prior_weights": module_digest(self.prior),
                "encoder": self.encoder_name, "encoder_config": self.encoder.extra_repr(),
                "encoder_weights": module_digest(self.encoder), "seed": self.seed,
                "evaluators": {e.name: module_digest(m) for e in self.evaluators for m in vars(e).values()
                               if isinstance(m, nn.Module)}}

    def method_configs(self) -> dict[str, dict]:
        return {m.name: method_config(m) for m in self.methods}

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

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Run every method on the batch's targets whose record is missing or stale; return the
        prediction (records, images, grid, curves) of ``featinv.harness``."""
        keys = list(zip(batch["dataset"], batch["index"].tolist()))
        fps = {m.name: [self.fingerprint(m.name, h) for h in self.target_hashes(batch)] for m in self.methods}
        todo = {m.name: [b for b, (d, i) in enumerate(keys) if not self.is_done((d, i, m.name, self.seed), fps[m.name][b])]
                for m in self.methods}
        pred = {"records": [], "images": {}, "grids": {}, "curves": {}}
        if not any(todo.values()):
            return pred
        with torch.enable_grad():
            target = self.targets(batch)
            bad = (~torch.isfinite(target).all(dim=1)).nonzero().flatten().tolist()
            if bad and self.on_bad_target == "raise":
                raise ValueError(f"target features contain NaN/inf for {[keys[b] for b in bad][:10]}; set "
                                 "model.on_bad_target=skip to record and skip such targets")
            cond = self.prior.encode_prompt(list(batch["prompt"])) if any(batch.get("prompt", [])) else None
            results: dict[str, tuple[list[int], InversionResult]] = {}
            for m in self.methods:
                pos = [b for b in todo[m.name] if b not in bad]
                if pos:  # per-target seeds: a subset gives the same results as the whole batch
                    results[m.name] = (pos, run_method(m, self.prior, self.encoder, target[pos], [keys[b] for b in pos],
                                                       seed=self.seed, progress=self.progress and self.global_rank == 0,
                                                       cond=cond[pos] if cond is not None else None))
        timg = batch["image"].detach().cpu() if batch["image"].numel() else None
        for b in bad:
            for m in self.methods:
                if b in todo[m.name]:
                    pred["records"].append({**self._base(batch, b, m.name), "fingerprint": fps[m.name][b],
                                            "skipped": "target features contain NaN/inf"})
        for name, (pos, r) in results.items():
            scores = evaluate(self.evaluators, r.images.to(self.device),
                              timg[pos].to(self.device) if timg is not None else None, batch["label"][pos])
            for j, b in enumerate(pos):
                rec = {**self._base(batch, b, name), "fingerprint": fps[name][b], **_scores(r, j),
                       **{k: float(v[j]) for k, v in scores.items()}}
                d, i = keys[b]
                rec["image"] = R.sample_path(d, i, name)
                pred["images"][rec["image"]] = r.images[j]
                if self.save_best:
                    rec["best_image"] = R.sample_path(d, i, name, "_best")
                    pred["images"][rec["best_image"]] = r.best_images[j]
                if timg is not None:
                    rec["target_image"] = R.sample_path(d, i, "target")
                    pred["images"][rec["target_image"]] = timg[b]
                pred["records"].append(rec)
            pred["curves"][(keys[0][0], name)] = r.distances
        rows = [timg] + [_full(len(keys), pos, r.images) for pos, r in results.values()]
        pred["grids"][f"{R.GRIDS}/{keys[0][0]}_{keys[0][1]:06d}.png"] = comparison_grid(rows)
        pred["grid_caption"] = "rows: " + " | ".join((["target"] if timg is not None else []) + list(results))
        return pred

    def _base(self, batch: dict, b: int, method: str) -> dict:
        return {"dataset": batch["dataset"][b], "index": int(batch["index"][b]), "label": int(batch["label"][b]),
                "text": batch["text"][b] or None, "method": method, "prior": self.prior_name,
                "encoder": self.encoder_name, "layer": getattr(self.encoder, "layer", None), "seed": int(self.seed)}


def _scores(r: InversionResult, j: int) -> dict:
    return {"final_cos": float(r.final_cos[j]), "final_l2": float(r.final_l2[j]),
            "final_rel_l2": float(r.final_rel_l2[j]), "best_cos": float(r.best_cos[j]), "best_l2": float(r.best_l2[j]),
            "nfe": int(r.nfe[j]), "backward": int(r.backward[j]),
            "nonfinite_updates": int(r.nonfinite[j]) if r.nonfinite.numel() else 0,
            "seconds": r.seconds / len(r.final_cos), "distances": [round(float(x), 6) for x in r.distances[j]]}


def _full(n: int, positions: list[int], imgs: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) with a method's images at ``positions``, white where it did not run (resumed)."""
    if len(positions) == n:
        return imgs
    full = torch.ones(n, *imgs.shape[1:])
    full[positions] = imgs
    return full
