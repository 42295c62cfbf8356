"""Evaluators: models that never guide, scoring every output of every method (held-out judges).

``build_evaluator(spec)`` takes an encoder spec, optionally named (``"vit=zoo:digits-vit@logits"``):

* an encoder gives ``cos`` -- cosine between its features of the output and of the target image
  (when the target is an image) -- and, for a classifier's logits (``@logits``), ``agree``:
  whether it predicts the same class for the output as for the target image (or as the target's
  label when there is no image), and ``conf``, its softmax confidence on the output;
* a *reader* (an object with ``read(images) -> {factor: (pred, conf)}``, e.g. the shapes world's
  ``zoo:shapes-reader``) gives, per factor, ``<factor>`` = agreement of its reading of the output
  with its reading of the target image, ``<factor>_value`` (the value it reads in the output, for
  histograms over outputs) and ``<factor>_conf``; ``mean``, the mean agreement over its factors (one
  number to choose a guidance setting by for an encoder that keeps every factor, e.g. a CLIP).

Every value is per sample, (B,) tensors; ``evaluate`` returns them under ``eval/<name>/<metric>``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from featinv.metrics import cosine
from featinv.specs import build_encoder

__all__ = ["Evaluator", "FeatureEvaluator", "ReaderEvaluator", "build_evaluator", "evaluate"]


class Evaluator:
    """``evaluator(images, target_images | None, labels | None) -> {metric: (B,)}``."""

    name: str = "evaluator"

    def __call__(self, images, target_images=None, labels=None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class FeatureEvaluator(Evaluator):
    def __init__(self, encoder, name: str, logits: bool = False):
        self.encoder, self.name, self.logits = encoder, name, logits

    @torch.no_grad()
    def __call__(self, images, target_images=None, labels=None):
        f = self.encoder(images).float()
        out = {}
        ft = self.encoder(target_images).float() if target_images is not None else None
        if ft is not None:
            out["cos"] = cosine(f, ft)
        if self.logits:
            pred = f.argmax(1)
            out["conf"] = F.softmax(f, dim=1).max(1).values
            if ft is not None:
                out["agree"] = (pred == ft.argmax(1)).float()
            elif labels is not None and (labels >= 0).all():
                out["agree"] = (pred == labels.to(pred.device)).float()
        return {k: v.cpu() for k, v in out.items()}


class ReaderEvaluator(Evaluator):
    def __init__(self, reader, name: str):
        self.reader, self.name = reader, name

    @torch.no_grad()
    def __call__(self, images, target_images=None, labels=None):
        out = {}
        read = self.reader.read(images)
        ref = self.reader.read(target_images) if target_images is not None else None
        for factor, (pred, conf) in read.items():
            out[f"{factor}_value"] = pred.float().cpu()
            out[f"{factor}_conf"] = conf.float().cpu()
            if ref is not None:
                out[factor] = (pred == ref[factor][0]).float().cpu()
        if ref is not None:
            out["mean"] = torch.stack([out[f] for f in read]).mean(0)
        return out


def build_evaluator(spec: str | Evaluator) -> Evaluator:
    """``"name=family:model@layer"`` or ``"family:model@layer"`` -> an evaluator (see module docstring)."""
    if not isinstance(spec, str):
        return spec
    name, eq, model = spec.partition("=")
    if not eq:
        name, model = spec.split(":", 1)[-1].split("?")[0], spec
    obj = build_encoder(model)
    if hasattr(obj, "read"):
        return ReaderEvaluator(obj, name)
    logits = "@logits" in model or "@output" in model
    return FeatureEvaluator(obj, name, logits=logits)


def evaluate(evaluators: Sequence[Evaluator], images, target_images=None, labels=None) -> dict[str, torch.Tensor]:
    """Every evaluator's metrics, keyed ``eval/<name>/<metric>``."""
    out = {}
    for ev in evaluators:
        for k, v in ev(images, target_images, labels).items():
            out[f"eval/{ev.name}/{k}"] = v
    return out
