"""``featinv.invert``: the five-line Python API over priors, encoders and methods."""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from featinv.contract import SampleOutput, make_generators
from featinv.encoders import Encoder
from featinv.methods import get_method
from featinv.metrics import cosine, rel_l2, sq_l2
from featinv.priors import Prior
from featinv.specs import build_encoder, build_prior

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
    """Validate a (B, D) target against the encoder: one clear error per kind of bad input.

    Refused: a wrong shape or dimension, NaN/inf, an all-zero row (its cosine is undefined) and a
    row whose squared norm overflows float32 (distances would be inf). A norm far outside what the
    encoder produces (x1000 or x1/1000 of its features of random images) gives a warning.
    """
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
    norm2 = target.float().pow(2).sum(dim=1)
    for what, rows in (("are all zero (cosine is undefined)", norm2 == 0),
                       ("overflow float32 (||f_s||^2 = inf): rescale them", ~torch.isfinite(norm2))):
        if rows.any():
            raise ValueError(f"target feature row(s) {rows.nonzero().flatten().tolist()[:10]} {what}")
    ref = _feature_norm(encoder)
    if ref is not None:
        ratio = norm2.sqrt() / ref
        odd = (ratio > 1e3) | (ratio < 1e-3)
        if odd.any():
            warnings.warn(f"target feature row(s) {odd.nonzero().flatten().tolist()[:10]} have norms "
                          f"{[f'{float(v):.3g}' for v in norm2[odd].sqrt()[:5]]}, far from the ~{ref:.3g} of "
                          f"{encoder.name!r}'s features of random images: are they from this encoder and layer?",
                          stacklevel=3)
    return target


def _feature_norm(encoder) -> float | None:
    """Mean feature norm of the encoder on 4 uniform-noise images (cached on the encoder)."""
    if getattr(encoder, "_ref_norm", None) is None:
        c, (h, w) = getattr(encoder, "in_chans", None) or 3, getattr(encoder, "input_size", None) or (32, 32)
        p = next(encoder.parameters(), None)
        try:
            with torch.no_grad():
                f = encoder(torch.rand(4, c, h, w, generator=torch.Generator().manual_seed(0)).to(
                    p.device if p is not None else None))
            encoder._ref_norm = float(f.float().norm(dim=1).mean())
        except Exception:  # an encoder that cannot take such images: skip the plausibility check
            return None
    return encoder._ref_norm if math.isfinite(encoder._ref_norm) and encoder._ref_norm > 0 else None


def invert(targets: torch.Tensor, *, prior: Prior | str = "zoo:digits-ddpm",
           encoder: Encoder | str = "zoo:digits-cnn", method="fast", seed: int = 0,
           keys: Sequence[tuple[str, int]] | None = None, cond=None, callback=None, progress: bool = False,
           **overrides) -> InversionResult:
    """Invert target features (B, D) or target images (B, C, H, W in [0, 1]) through ``encoder``.

    >>> r = featinv.invert(images, prior="zoo:digits-ddpm", encoder="zoo:digits-cnn", method="fast")
    >>> r.images, r.final_cos, r.distances

    ``method`` is a preset name (``featinv.list_methods()``) or a method object; ``overrides``
    change preset fields (``weight=2``). ``keys`` = (dataset, index) per target seeds each target's
    noise via ``target_seed`` (default: ("adhoc", i)). ``cond``: per-target prompts (list of str)
    or prompt embeddings (B, L, D) for a text-conditioned prior (default: its empty prompt).
    """
    prior, encoder = build_prior(prior), build_encoder(encoder)
    encoder = encoder.to(prior.device)
    method = get_method(method, **overrides) if isinstance(method, str) else method
    targets = targets.to(prior.device)
    if targets.ndim == 4:
        with torch.no_grad():
            targets = encoder(targets)
    keys = keys if keys is not None else [("adhoc", i) for i in range(len(targets))]
    if cond is not None and not isinstance(cond, torch.Tensor):
        cond = prior.encode_prompt(list(cond))
    return run_method(method, prior, encoder, targets, keys, seed=seed, cond=cond, callback=callback,
                      progress=progress)


def run_method(method, prior: Prior, encoder: Encoder, target: torch.Tensor, keys: Sequence[tuple[str, int]],
               *, seed: int = 0, cond=None, callback=None, progress: bool = False) -> InversionResult:
    """Run one method on target features (B, D) and score its images under ``encoder``."""
    target = check_targets(target.float(), encoder)
    gens = make_generators([target_seed(seed, d, int(i)) for d, i in keys])
    start = time.perf_counter()
    extra = {"cond": cond} if cond is not None else {}
    out: SampleOutput = method(prior, encoder, target, gens, callback=callback, progress=progress, **extra)
    with torch.no_grad():
        f_final = encoder(out.images.to(target.device)).cpu()
        f_best = encoder(out.best_images.to(target.device)).cpu()
    seconds = time.perf_counter() - start
    for what, x in (("images", out.images), ("best_images", out.best_images)):
        bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
        if bad.any():
            name = getattr(method, "name", type(method).__name__)
            raise RuntimeError(f"method {name!r} produced non-finite {what} for target(s) "
                               f"{[keys[i] for i in bad.nonzero().flatten().tolist()][:10]}; refusing to record them")
    t, n = target.cpu(), len(target)
    return InversionResult(
        method=getattr(method, "name", type(method).__name__), images=out.images, best_images=out.best_images,
        target=t, final_features=f_final, best_features=f_best, distances=out.distances,
        final_cos=cosine(f_final, t), final_l2=sq_l2(f_final, t), final_rel_l2=rel_l2(f_final, t),
        best_cos=cosine(f_best, t), best_l2=sq_l2(f_best, t), nfe=torch.as_tensor(out.nfe).expand(n).clone(),
        backward=torch.as_tensor(out.backward).expand(n).clone(),
        nonfinite=out.nonfinite, seconds=seconds)
