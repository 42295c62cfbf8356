"""The contract every method shares: one call signature, one output, one per-step callback dict.

A *method* (a guided sampler preset, an activation-maximisation baseline, ...) is any callable::

    method(prior, encoder, target, generators, *, cond=None, callback=None, progress=False) -> SampleOutput

* ``prior``: a ``featinv.priors.Prior`` (baselines use only its image shape and device);
* ``encoder``: image in [0, 1] (B, C, H, W) -> feature (B, D);
* ``target``: (B, D) target features (objectives that ignore the target still get it);
* ``generators``: one ``torch.Generator`` per sample; all randomness of sample b comes from
  ``generators[b]``, so a target's result never depends on its batch;
* ``cond``: per-sample conditioning of the prior (prompt embeddings (B, L, D)), or None for the
  prior's default (the empty prompt for text-to-image priors); methods that cannot use it refuse it;
* ``callback``: called once per step with a ``StepInfo`` dict (below), k-diffusion style.

It has a ``name`` (str) and returns ``SampleOutput``. ``featinv.methods`` holds the registry.

Per-step callback dict (every method sends every key):

    step        int            0 .. S-1, the index along ``SampleOutput.distances``
    t           int | None     diffusion timestep (None for optimisation baselines)
    index       LongTensor     rows of the batch this step updated (stopped samples drop out)
    distance    Tensor (b,)    the tracked objective of each row (what ``distances`` records)
    cosine      Tensor (b,)    cos(f(x0), f_s) per row
    x0          Tensor (b,C,H,W)  the current image estimate in [0, 1]
    z           Tensor         the optimised state (z_t for diffusion; pixels / spectrum for baselines)
    recurrence  int            K(t), repeats of this step (1 for baselines)
    weight      float          the effective guidance weight w * schedule(t) (0 when unguided;
                               the learning rate for baselines)
    loss        Tensor (b,)    what the update descends (the objective; plus the regularisers for
                               baselines)
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypedDict, runtime_checkable

import torch

__all__ = ["Method", "SampleOutput", "StepInfo", "Callback", "make_generators", "randn", "per_sample",
           "progress_bar", "NotApplicableError"]


class StepInfo(TypedDict):
    step: int
    t: int | None
    index: torch.Tensor
    distance: torch.Tensor
    cosine: torch.Tensor
    x0: torch.Tensor
    z: torch.Tensor
    recurrence: int
    weight: float
    loss: torch.Tensor


Callback = Callable[[StepInfo], None]


@dataclass
class SampleOutput:
    """What every method returns for a batch of B targets (tensors on CPU)."""

    images: torch.Tensor  # (B, C, H, W) final images in [0, 1]
    best_images: torch.Tensor  # (B, C, H, W) best along the trajectory (lowest distance)
    distances: torch.Tensor  # (B, S) objective (feature distance) at every step
    best_distance: torch.Tensor  # (B,)
    nfe: torch.Tensor  # (B,) prior (UNet) evaluations per sample; encoder passes for baselines
    backward: torch.Tensor  # (B,) backward passes per sample
    nonfinite: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (B,)


@runtime_checkable
class Method(Protocol):
    """See the module docstring."""

    name: str

    def __call__(self, prior, encoder, target: torch.Tensor, generators: Sequence[torch.Generator], *,
                 cond: torch.Tensor | None = None, callback: Callback | None = None,
                 progress: bool = False) -> SampleOutput: ...


class NotApplicableError(ValueError):
    """A method cannot run with this encoder or prior (e.g. DeepInversion without BatchNorm)."""


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: a target's noise depends on its own seed only."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def randn(generators: Sequence[torch.Generator], shape: Sequence[int], device=None, dtype=torch.float32):
    """Stack of per-sample standard normals, shape (B, *shape)."""
    z = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    return z.to(device=device, dtype=dtype)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) vector viewed as (B, 1, 1, ...) to broadcast against ``like``."""
    return v.view(-1, *([1] * (like.ndim - 1)))


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar over a method's steps (disabled unless ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"sampling [{desc}]", disable=not enabled, leave=False, dynamic_ncols=True)
