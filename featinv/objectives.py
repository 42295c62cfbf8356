"""Objectives: what a method drives the encoder's feature towards, one signature for all.

Every objective is a callable ``objective(feat, target) -> (B,)``, a per-sample loss to *minimise*:

* ``FeatureMatch()``: ||f - f_s||^2, feature inversion (the default everywhere; ``relative=True``
  gives ||f - f_s||^2 / ||f_s||^2, Mahendran & Vedaldi 2015's normalised loss).
* ``Activation(index)``: -(activation of a unit or channel), activation maximisation
  (Erhan et al. 2009; Olah et al. 2017 "Feature Visualization").
* ``ClassLogit(k)``: -logit_k (or -log p_k with ``log_prob=True``) of a classifier's output.
* ``Direction(v)``: -cos(f, v), a direction in feature space (``v=None``: the target's direction).
* ``Projection(v)``: -mean_p v^T x_p, the dot product with a direction at every spatial position of a
  conv layer, averaged over positions: EDDP's activation maximisation of an encoding direction
  (Doumanoglou et al., arXiv 2509.23926: maximise the signal written along s_i). Unbounded, unlike
  ``Direction``: it rewards moving *further* along v, not only turning towards it.

``feat`` is what ``featinv.encoders.Encoder`` returns, a (B, D) vector: the layer's activation
flattened (``pool=None``), pooled over space/tokens (``pool="avg"``) or the CLS token
(``pool="cls"``). ``target`` is the (B, D) target feature; objectives that do not need it ignore it.

Channel objectives on convolutional layers. The Encoder flattens a (B, C, H, W) activation to
(B, C*H*W) in C-major order, so with ``pool=None``, ``Activation(c*H*W + y*W + x)`` is the single
unit (c, y, x). To maximise a *channel's mean* activation, build the encoder with ``pool="avg"``:
then entry c of the (B, C) vector *is* the spatial mean of channel c, and ``Activation(c)`` is the
channel objective (no Encoder change needed)::

    enc = Encoder(model, "layer3", pool="avg", ...)         # (B, C): channel means
    featinv.get_method("fourier", objective={"kind": "activation", "index": 7})

Objectives also accept a raw activation (B, C, H, W) or a token sequence (B, N, D): ``Activation``
then reduces it to channel means itself (mean over H, W or over tokens), as ``pool="avg"`` does.

From YAML, ``objective`` is a string or a dict (see ``make_objective``):
``"feature"``, ``"feature:relative"``, ``"unit:7"``/``"channel:7"``/``"activation:7"``, ``"logit:3"``,
``"direction"``, ``"projection"``, or ``{kind: activation, index: [3, 5]}``, ``{kind: direction, v: [...]}``,
``{kind: projection, v: [...]}`` (v has the layer's C entries).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from featinv.metrics import rel_l2, sq_l2

__all__ = ["Objective", "FeatureMatch", "Activation", "ClassLogit", "Direction", "Projection", "make_objective",
           "resolve_objective", "OBJECTIVES", "tile_direction"]


class Objective:
    """Base class: ``__call__(feat, target) -> (B,)`` per-sample loss to minimise."""

    def __call__(self, feat: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def _as_vector(feat: torch.Tensor) -> torch.Tensor:
    """(B, D) as is; (B, C, H, W) -> channel means (B, C); (B, N, D) -> token mean (B, D)."""
    if feat.ndim == 4:
        return feat.mean(dim=(2, 3))
    if feat.ndim == 3:
        return feat.mean(dim=1)
    if feat.ndim == 2:
        return feat
    raise ValueError(f"expected features (B, D), (B, N, D) or (B, C, H, W), got shape {tuple(feat.shape)}")


def _indices(index, dim: int, device) -> torch.Tensor:
    idx = torch.as_tensor(index, dtype=torch.long, device=device).flatten()
    if idx.numel() == 0:
        raise ValueError("an index list must not be empty")
    bad = (idx < -dim) | (idx >= dim)
    if bad.any():
        raise IndexError(f"index {idx[bad].tolist()} out of range for a feature of dimension {dim}")
    return idx


@dataclass(eq=False)
class FeatureMatch(Objective):
    """||f - f_s||^2 (Shirahama et al. 2025); ``relative``: divided by ||f_s||^2 (Mahendran & Vedaldi 2015)."""

    relative: bool = False

    def __call__(self, feat, target=None):
        if target is None:
            raise ValueError("FeatureMatch needs target features")
        f = feat.flatten(1).float()
        t = target.to(f.device).flatten(1).float()
        return rel_l2(f, t) if self.relative else sq_l2(f, t)


@dataclass(eq=False)
class Activation(Objective):
    """Maximise the activation of unit(s) ``index`` of the feature vector: loss = -activation.

    ``index``: an int, or a list (their mean is maximised). With an ``Encoder(pool="avg")`` on a
    conv layer the index is a channel and the activation is that channel's spatial mean; with
    ``pool=None`` it indexes the flattened (C, H, W) activation (one spatial unit).
    """

    index: int | Sequence[int] = 0

    def activation(self, feat: torch.Tensor) -> torch.Tensor:
        """The activation being maximised, (B,)."""
        v = _as_vector(feat).float()
        return v[:, _indices(self.index, v.shape[1], v.device)].mean(dim=1)

    def __call__(self, feat, target=None):
        return -self.activation(feat)


@dataclass(eq=False)
class ClassLogit(Objective):
    """Maximise class ``k``'s logit (encoder at the classifier output, ``layer=None`` or the head).

    ``log_prob=True`` maximises log softmax_k instead, which also pushes the other classes down.
    """

    k: int = 0
    log_prob: bool = False

    def __call__(self, feat, target=None):
        v = _as_vector(feat).float()
        idx = _indices(self.k, v.shape[1], v.device)
        if idx.numel() != 1:
            raise ValueError(f"ClassLogit takes one class index, got {self.k!r}")
        score = F.log_softmax(v, dim=1) if self.log_prob else v
        return -score[:, idx[0]]


@dataclass(eq=False)
class Direction(Objective):
    """Maximise cos(f, v): loss = -cos(f, v). ``v`` (D,) or (B, D); ``None`` uses the target feature."""

    v: Any = None

    def __call__(self, feat, target=None):
        f = _as_vector(feat).float()
        v = target if self.v is None else torch.as_tensor(self.v, dtype=torch.float32)
        if v is None:
            raise ValueError("Direction(v=None) takes the target's direction and needs target features")
        v = v.to(f.device).float()
        v = v.expand_as(f) if v.ndim == 1 else v.flatten(1)
        if v.shape != f.shape:
            raise ValueError(f"direction of shape {tuple(v.shape)} does not match features {tuple(f.shape)}")
        return -F.cosine_similarity(f, v, dim=1, eps=1e-12)


@dataclass(eq=False)
class Projection(Objective):
    """Maximise the mean over positions of the dot product with ``v``: loss = -(1/P) sum_p v^T x_p.

    EDDP validates an encoding direction s_i by activation maximisation of this quantity at the layer
    the direction lives in (the signal written along s_i, averaged over the map). ``feat`` is a conv
    layer's activation (B, C, H, W), a token sequence (B, N, C), or the encoder's flattened C-major
    vector (B, C*H*W) (``Encoder(pool=None)``), read with C = len(v). ``v``: (C,) shared or (B, C) one
    direction per sample; ``normalize`` uses v / ||v|| (activation units along a unit direction).

    ``v=None`` takes the direction from the target, a (B, C*H*W) field t as the encoder gives:
    loss = -<f, t> / ||t||^2, which is -(1/P) sum_p s^T x_p when t is a unit s tiled over the P
    positions (``tile_direction``): one batch can then maximise a different direction per sample.
    """

    v: Any = None
    normalize: bool = True

    def projection(self, feat: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The maximised quantity per sample, (B,)."""
        f = feat.float()
        B = f.shape[0]
        if self.v is None:
            if target is None:
                raise ValueError("Projection(v=None) takes the direction field from the target, which is missing")
            t = target.to(f.device).float().flatten(1)
            f = f.flatten(1)
            if t.shape != f.shape:
                raise ValueError(f"target field {tuple(t.shape)} does not match features {tuple(f.shape)}")
            return (f * t).sum(1) / t.pow(2).sum(1).clamp_min(1e-12)
        v = torch.as_tensor(self.v, dtype=torch.float32).to(f.device)
        C = v.shape[-1]
        if self.normalize:
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if f.ndim == 4 and f.shape[1] == C:
            x = f.flatten(2)                                  # (B, C, P)
        elif f.ndim == 3 and f.shape[2] == C:
            x = f.transpose(1, 2)
        elif f.ndim == 2 and f.shape[1] % C == 0:
            x = f.view(B, C, -1)                              # the Encoder's C-major flattening
        else:
            raise ValueError(f"a direction of {C} channels does not fit features of shape {tuple(f.shape)}")
        v = v.expand(B, C) if v.ndim == 1 else v
        if v.shape != (B, C):
            raise ValueError(f"direction of shape {tuple(v.shape)} for {B} samples of {C} channels")
        return torch.einsum("bcp,bc->b", x, v) / x.shape[2]

    def __call__(self, feat, target=None):
        return -self.projection(feat, target)


def tile_direction(s: torch.Tensor, positions: int) -> torch.Tensor:
    """A unit direction s (C,) or (B, C) repeated at every one of ``positions`` positions, flattened C-major
    like ``Encoder(pool=None)``: (C*P,) or (B, C*P), the target field of ``Projection(v=None)``."""
    s = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return s.unsqueeze(-1).expand(*s.shape, positions).flatten(-2)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "feature": FeatureMatch, "l2": FeatureMatch,
    "activation": Activation, "unit": Activation, "channel": Activation,
    "logit": ClassLogit, "class": ClassLogit,
    "direction": Direction, "cosine": Direction,
    "projection": Projection, "dot": Projection,
}


def make_objective(spec) -> Objective | Callable | None:
    """An objective from a spec: ``None``, an objective or any callable, a string, or a dict.

    Strings: ``"feature"``, ``"feature:relative"``, ``"activation:7"`` (also ``unit:``/``channel:``;
    ``"activation:3,5"`` = mean of units 3 and 5), ``"logit:3"`` (``class:``), ``"direction"``.
    Dicts: ``{"kind": <name>, **fields}``, e.g. ``{"kind": "activation", "index": 7}``.
    """
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str):
        kind, _, arg = spec.partition(":")
        kind = kind.strip().lower()
        if kind not in OBJECTIVES:
            raise KeyError(f"unknown objective {spec!r}; kinds: {sorted(OBJECTIVES)}")
        cls = OBJECTIVES[kind]
        if not arg:
            return cls()
        if cls is FeatureMatch:
            if arg.strip() not in ("relative", "rel"):
                raise ValueError(f"objective {spec!r}: 'feature' takes ':relative' or nothing")
            return FeatureMatch(relative=True)
        if cls in (Direction, Projection):
            raise ValueError(f"objective {spec!r}: give a direction as a dict {{kind: direction, v: [...]}}")
        nums = [int(a) for a in arg.split(",")]
        if cls is ClassLogit:
            if len(nums) != 1:
                raise ValueError(f"objective {spec!r}: one class index")
            return ClassLogit(nums[0])
        return Activation(nums[0] if len(nums) == 1 else nums)
    if isinstance(spec, dict):
        spec = dict(spec)
        kind = spec.pop("kind", None) or spec.pop("type", None)
        if kind is None or str(kind).lower() not in OBJECTIVES:
            raise KeyError(f"objective dict {spec} needs 'kind' in {sorted(OBJECTIVES)}")
        return OBJECTIVES[str(kind).lower()](**spec)
    raise TypeError(f"cannot make an objective from {spec!r} ({type(spec).__name__})")


def resolve_objective(spec, default: Objective | None = None):
    """``make_objective(spec)``, with ``None`` meaning ``default`` (``FeatureMatch()`` if not given)."""
    obj = make_objective(spec)
    if obj is None:
        obj = default if default is not None else FeatureMatch()
    return obj
