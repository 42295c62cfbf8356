"""What DiffExplainer / DEXTER maximise, and the authors' activation score of a prompt.

* ``ClassTarget(classifier, k)``: images in [0, 1] -> ``Scores``: per-sample loss (DEXTER: cross-entropy
  to class k, Carnemolla et al. 2025 Eq. / code ``CrossEntropyLoss(f(img), c)``; ``loss="logit"``: -logit_k
  as DiffExplainer's class-output maximisation), hit = argmax == k, value = logit_k. With ``units`` (indices
  into a feature layer given by ``features``: images -> (B, D)) the per-slot losses are [CE, -f_u1, ...],
  DEXTER's multi-mask objective (class + its top "salient" penultimate features); ``salient_units`` picks
  the units with the largest weights to class k in a linear head.
* ``UnitTarget(encoder, index)``: maximise a hidden unit (DiffExplainer's hidden-feature mode); hit =
  activation above ``threshold`` (if given).
* ``activation_score``: the share of ``n`` samples (fixed steps, CFG per the config, seeded noise) from a
  prompt's conditioning that the classifier assigns to the target - DEXTER's metric
  (``metrics/activation_score.py``: 100 images, 4 steps, CFG 1); also their mean logit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featinv.contract import make_generators, randn
from featinv.explain.unrolled import unrolled_sample

__all__ = ["Scores", "ClassTarget", "UnitTarget", "salient_units", "activation_score", "sample_from"]


@dataclass
class Scores:
    loss: torch.Tensor  # (B,) to minimise
    hit: torch.Tensor  # (B,) bool: the target is reached (frames are saved for these)
    value: torch.Tensor  # (B,) logit / activation being maximised
    slot_losses: torch.Tensor | None = None  # (B, n) DEXTER's per-slot losses (CE first), if any


class ClassTarget:
    """Class ``k`` of ``classifier`` (images (B, C, H, W) in [0, 1] -> logits (B, K)); see the module doc."""

    def __init__(self, classifier, k: int, loss: str = "ce", features=None, units: list[int] | None = None):
        if loss not in ("ce", "logit"):
            raise ValueError(f"loss must be 'ce' or 'logit', got {loss!r}")
        if (features is None) != (not units):
            raise ValueError("give both `features` and `units` (DEXTER's salient-feature losses), or neither")
        self.classifier, self.k, self.loss, self.features, self.units = classifier, int(k), loss, features, units

    def __call__(self, images: torch.Tensor) -> Scores:
        logits = self.classifier(images).float()
        if logits.ndim != 2 or not 0 <= self.k < logits.shape[1]:
            raise ValueError(f"class {self.k} is out of range for logits of shape {tuple(logits.shape)}")
        tgt = torch.full((logits.shape[0],), self.k, device=logits.device)
        ce = F.cross_entropy(logits, tgt, reduction="none")
        value = logits[:, self.k]
        loss = ce if self.loss == "ce" else -value
        slots = None
        if self.units:
            f = self.features(images).float()
            feat_losses = -f[:, self.units]
            slots = torch.cat([ce[:, None], feat_losses], dim=1)
            loss = loss + feat_losses.sum(dim=1)
        return Scores(loss, logits.argmax(dim=1) == self.k, value, slots)


class UnitTarget:
    """Maximise unit ``index`` of ``encoder`` (images -> (B, D)); hit = activation > ``threshold``."""

    def __init__(self, encoder, index: int, threshold: float | None = None):
        self.encoder, self.index, self.threshold = encoder, int(index), threshold

    def __call__(self, images: torch.Tensor) -> Scores:
        a = self.encoder(images).float().flatten(1)[:, self.index]
        hit = a > self.threshold if self.threshold is not None else torch.zeros_like(a, dtype=torch.bool)
        return Scores(-a, hit, a)


def salient_units(head_weight: torch.Tensor, k: int, n: int = 5) -> list[int]:
    """The ``n`` input units of a linear head with the largest weight to class ``k`` (DEXTER's per-class
    "salient" penultimate features, here read from the head instead of Salient-ImageNet's lists)."""
    return head_weight[k].topk(n).indices.tolist()


@torch.no_grad()
def sample_from(prior, cond: torch.Tensor, n: int, *, steps: int, cfg_scale: float = 1.0, seed: int = 0,
                batch: int = 50) -> torch.Tensor:
    """``n`` images from conditioning ``cond`` (1, L, D): the unrolled sampler without gradients, noise
    of image i from seed ``seed + i``."""
    out = []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        noise = randn(make_generators(range(seed + i, seed + i + m)), prior.latent_shape, device=prior.device)
        out.append(unrolled_sample(prior, cond.to(prior.device), noise, steps, cfg_scale=cfg_scale).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def activation_score(prior, target, cond: torch.Tensor, *, n: int = 100, steps: int = 8, cfg_scale: float = 1.0,
                     seed: int = 10_000, batch: int = 50, return_images: bool = False) -> dict:
    """DEXTER's activation score of a prompt's conditioning: the share of ``n`` samples the target hits,
    and the mean value (logit / activation) over them (module docstring)."""
    imgs = sample_from(prior, cond, n, steps=steps, cfg_scale=cfg_scale, seed=seed, batch=batch)
    dev = prior.device
    sc = [target(imgs[i:i + batch].to(dev)) for i in range(0, n, batch)]
    hit = torch.cat([s.hit for s in sc]).float().cpu()
    value = torch.cat([s.value for s in sc]).float().cpu()
    out = dict(score=float(hit.mean()), mean_value=float(value.mean()), n=n, steps=steps, cfg_scale=cfg_scale, seed=seed)
    if return_images:
        out["images"], out["hits"] = imgs, hit.bool()
    return out
