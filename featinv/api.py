"""``featinv.invert``: the five-line Python API over priors, encoders and methods."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from featinv.encoders import Encoder, build_encoder
from featinv.guidance import SampleOutput, get_method, make_generators
from featinv.metrics import cosine, rel_l2, sq_l2
from featinv.priors import Prior, build_prior

__all__ = ["invert", "run_method", "InversionResult", "target_seed", "check_targets"]


def target_seed(seed: int, dataset: str, index: int) -> int:
    """A 63-bit seed from (seed, dataset, index): a target's noise never depends on its batch."""
    h = hashlib.blake2b(f"{seed}/{dataset}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@dataclass
class InversionResult:
    """Per-target outputs of one method on a batch (tensors on CPU)."""

    method: str
    images: torch.Tensor  # (B, C, H, W) final images in [0, 1]
    best_images: torch.Tensor  # (B, C, H, W)
    target: torch.Tensor  # (B, D) target features
    final_features: torch.Tensor  # (B, D)
    best_features: torch.Tensor  # (B, D)
    distances: torch.Tensor  # (B, S) per-step feature distance
    final_cos: torch.Tensor  # (B,)
    final_l2: torch.Tensor  # (B,) squared L2
    final_rel_l2: torch.Tensor  # (B,)
    best_cos: torch.Tensor  # (B,)
    best_l2: torch.Tensor  # (B,)
    nfe: torch.Tensor  # (B,) prior evaluations per target
    backward: torch.Tensor  # (B,) backward passes through the prior per target
    nonfinite: torch.Tensor  # (B,) guidance updates skipped because the gradient was NaN/inf
    seconds: float  # wall time of the batch


def check_targets(target: torch.Tensor, encoder: Encoder) -> torch.Tensor:
    """Validate a (B, D) target against the encoder: one clear error per kind of bad input."""
    if target.ndim != 2:
        raise ValueError(f"target features must be (B, D), got shape {tuple(target.shape)}")
    dim = encoder.dim
    if target.shape[1] != dim:
        raise ValueError(f"target feature dimension {target.shape[1]} does not match encoder "
                         f"{encoder.name!r}, which gives {dim}: encode the targets with the same "
                         "encoder and layer, or change `encoder`")
    bad = ~torch.isfinite(target).all(dim=1)
    if bad.any():
        raise ValueError(f"target features contain NaN/inf in row(s) {bad.nonzero().flatten().tolist()[:10]}")
    return target


def invert(targets: torch.Tensor, *, prior: Prior | str = "zoo:digits-ddpm",
           encoder: Encoder | str = "zoo:digits-cnn", method="fast", seed: int = 0,
           keys: Sequence[tuple[str, int]] | None = None, callback=None, progress: bool = False,
           **overrides) -> InversionResult:
    """Invert target features (B, D) or target images (B, C, H, W in [0, 1]) through ``encoder``.

    >>> r = featinv.invert(images, prior="zoo:digits-ddpm", encoder="zoo:digits-cnn", method="fast")
    >>> r.images, r.final_cos, r.distances

    ``method`` is a preset name (``featinv.list_methods()``) or a method object; ``overrides``
    change preset fields (``weight=2``). ``keys`` = (dataset, index) per target seeds each target's
    noise via ``target_seed`` (default: ("adhoc", i)).
    """
    prior, encoder = build_prior(prior), build_encoder(encoder)
    encoder = encoder.to(prior.device)
    method = get_method(method, **overrides) if isinstance(method, str) else method
    targets = targets.to(prior.device)
    if targets.ndim == 4:
        with torch.no_grad():
            targets = encoder(targets)
    keys = keys if keys is not None else [("adhoc", i) for i in range(len(targets))]
    return run_method(method, prior, encoder, targets, keys, seed=seed, callback=callback, progress=progress)


def run_method(method, prior: Prior, encoder: Encoder, target: torch.Tensor, keys: Sequence[tuple[str, int]],
               *, seed: int = 0, callback=None, progress: bool = False) -> InversionResult:
    """Run one method on target features (B, D) and score its images under ``encoder``."""
    target = check_targets(target.float(), encoder)
    gens = make_generators([target_seed(seed, d, int(i)) for d, i in keys])
    start = time.perf_counter()
    out: SampleOutput = method(prior, encoder, target, gens, callback=callback, progress=progress)
    with torch.no_grad():
        f_final = encoder(out.images.to(target.device)).cpu()
        f_best = encoder(out.best_images.to(target.device)).cpu()
    seconds = time.perf_counter() - start
    t, n = target.cpu(), len(target)
    return InversionResult(
        method=getattr(method, "name", type(method).__name__), images=out.images, best_images=out.best_images,
        target=t, final_features=f_final, best_features=f_best, distances=out.distances,
        final_cos=cosine(f_final, t), final_l2=sq_l2(f_final, t), final_rel_l2=rel_l2(f_final, t),
        best_cos=cosine(f_best, t), best_l2=sq_l2(f_best, t), nfe=torch.as_tensor(out.nfe).expand(n).clone(),
        backward=torch.as_tensor(out.backward).expand(n).clone(),
        nonfinite=out.nonfinite, seconds=seconds)
