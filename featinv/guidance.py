"""Guided diffusion for feature inversion (Shirahama et al., 2025, "Feature Space Analysis by
Guided Diffusion Model"), as one step function with presets.

At every sampling step t, for k = 1..K(t) (self-recurrence, Bansal et al. 2023, Alg. 1):

    eps   = eps_theta(z_t, t)
    x0    = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)                    # Tweedie / DDPM Eq. 15
    L     = || f(decode(x0)) - f_s ||^2                              # per sample
    g     = dL/dz_t                                                  # through the UNet
    g     = g * ||eps|| / ||g||                                      # rescale (per sample)
    g     = clamp(g, mean(g) - k std(g), mean(g) + k std(g))        # element-wise (per sample)
    eps'  = eps + w g                                                # moves z_{t-1} downhill on L
    z_{t-1} = DDIM/DDPM step(eps', z_t)                              # eta = 1: DDPM ancestral
    if k < K(t): z_t = sqrt(a_t / a_{t-1}) z_{t-1} + sqrt(1 - a_t / a_{t-1}) xi   # re-noise

and the image whose x0 came closest to f_s along the trajectory is kept as ``best``.

DDPM ancestral sampling is DDIM with eta = 1 over the training timesteps (Song et al. 2021,
Eq. 16 with sigma_t^2 = beta~_t); diffusers' ``DDIMScheduler`` is used for both so that the noise
of each sample comes from its own generator (``variance_noise``). Every statistic (gradient norm,
mean, std) is per sample: results do not depend on batch size or position.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from featinv.metrics import cosine, sq_l2

__all__ = ["Guidance", "SampleOutput", "PRESETS", "get_method", "list_methods", "randn", "make_generators"]

Callback = Callable[[dict], None]


# -- per-sample randomness -----------------------------------------------------------------------
def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: a target's noise depends on its own seed only."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def randn(generators: Sequence[torch.Generator], shape: Sequence[int], device=None, dtype=torch.float32):
    """Stack of per-sample standard normals, shape (B, *shape)."""
    z = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    return z.to(device=device, dtype=dtype)


# -- outputs ---------------------------------------------------------------------------------------
@dataclass
class SampleOutput:
    """What every method returns for a batch of B targets."""

    images: torch.Tensor  # (B, C, H, W) final images in [0, 1]
    best_images: torch.Tensor  # (B, C, H, W) best along the trajectory (lowest distance)
    distances: torch.Tensor  # (B, S) feature distance ||f(x0_t) - f_s||^2 at every step
    best_distance: torch.Tensor  # (B,)
    nfe: int  # network (prior) evaluations per sample
    backward: int  # backward passes per sample
    nonfinite: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # (B,) skipped updates


# -- gradient shaping --------------------------------------------------------------------------------
def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def rescale_to(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """g * ||ref|| / ||g||, per sample (Shirahama et al. 2025: gradient scaled to the noise norm)."""
    gn = _per_sample(g).norm(dim=1).clamp_min(1e-12)
    rn = _per_sample(ref).norm(dim=1)
    return g * _view(rn / gn, g)


def clamp_std(g: torch.Tensor, k: float) -> torch.Tensor:
    """Element-wise clamp to mean ± k·std of the sample's own gradient."""
    flat = _per_sample(g)
    m, s = flat.mean(dim=1), flat.std(dim=1)
    return torch.clamp(g, _view(m - k * s, g), _view(m + k * s, g))


# -- the guided sampler -------------------------------------------------------------------------------
@dataclass
class Guidance:
    """A guided sampler: every knob of the step function above.

    Args:
        steps: sampling steps (1000 = every training timestep, as the reference).
        eta: 1 = DDPM ancestral, 0 = deterministic DDIM.
        weight: w in eps' = eps + w g (0 = unguided).
        rescale: rescale g to ||eps|| per sample.
        clamp_k: clamp g element-wise to mean ± k·std per sample (None = off).
        recurrence: K, repetitions of each step (re-noise and repeat).
        early_steps, early_recurrence: K for the first ``early_steps`` steps ("early-step emphasis").
    """

    name: str = "guided"
    steps: int = 1000
    eta: float = 1.0
    weight: float = 4.0
    rescale: bool = True
    clamp_k: float | None = 3.0
    recurrence: int = 8
    early_steps: int = 5
    early_recurrence: int = 1000

    def recurrences(self) -> list[int]:
        """K(t) for each of the ``steps`` sampling steps."""
        return [self.early_recurrence if i < self.early_steps else self.recurrence for i in range(self.steps)]

    @property
    def guided(self) -> bool:
        return self.weight != 0

    def nfe(self) -> int:
        return sum(self.recurrences())

    def __call__(self, prior, encoder: nn.Module, target: torch.Tensor, generators: Sequence[torch.Generator],
                 *, callback: Callback | None = None, progress: bool = False) -> SampleOutput:
        return guided_sample(self, prior, encoder, target, generators, callback=callback, progress=progress)


def _scheduler(prior, steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(prior.scheduler_config, clip_sample=False, set_alpha_to_one=True,
                                      timestep_spacing="trailing", thresholding=False,
                                      prediction_type="epsilon")  # the prior already returns eps
    sched.set_timesteps(steps, device=prior.device)
    return sched


def guided_sample(cfg: Guidance, prior, encoder, target, generators, *, callback=None, progress=False) -> SampleOutput:
    """Run the guided reverse process for a batch of target features ``target`` (B, D)."""
    sched = _scheduler(prior, cfg.steps)
    acp = prior.alphas_cumprod.float()
    dev, B = prior.device, target.shape[0]
    if len(generators) != B:
        raise ValueError(f"need one generator per target: {len(generators)} generators for {B} targets")
    target = target.to(dev).float()
    z = randn(generators, prior.latent_shape, device=dev)
    ks = cfg.recurrences()
    distances = torch.zeros(B, len(sched.timesteps))
    best_d = torch.full((B,), math.inf)
    best_img = None
    nonfinite = torch.zeros(B, dtype=torch.long)
    step_ratio = prior.num_train_timesteps // cfg.steps
    bar = _progress(len(sched.timesteps), progress, cfg.name)
    for i, t in enumerate(sched.timesteps):
        t = int(t)
        prev = t - step_ratio
        a_t = acp[t]
        a_prev = acp[prev] if prev >= 0 else torch.tensor(1.0)
        for k in range(ks[i]):
            with torch.enable_grad() if cfg.guided else torch.no_grad():
                zt = z.detach().requires_grad_(cfg.guided)
                eps = prior.eps(zt, t).float()
                x0 = (zt - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                img = prior.decode(x0)
                feat = encoder(img)
                d = sq_l2(feat, target)
                if cfg.guided:
                    (g,) = torch.autograd.grad(d.sum(), zt)
                    bad = ~torch.isfinite(_per_sample(g)).all(dim=1)
                    if bad.any():  # never let one sample's NaN reach the image: skip its update
                        g = torch.where(_view(bad, g), torch.zeros_like(g), g)
                        nonfinite += bad.cpu().long()
                    if cfg.rescale:
                        g = rescale_to(g, eps.detach())
                    if cfg.clamp_k is not None:
                        g = clamp_std(g, cfg.clamp_k)
                    eps = eps.detach() + cfg.weight * g
            d = d.detach().cpu()
            better = d < best_d
            if better.any():
                best_d = torch.where(better, d, best_d)
                im = img.detach().cpu()
                best_img = im.clone() if best_img is None else torch.where(_view(better, im), im, best_img)
            noise = randn(generators, prior.latent_shape, device=dev) if cfg.eta > 0 else None
            z_prev = sched.step(eps.detach(), t, zt.detach(), eta=cfg.eta, variance_noise=noise).prev_sample
            if k < ks[i] - 1:  # self-recurrence: back to t with fresh noise
                ratio = a_t / a_prev
                z = ratio.sqrt() * z_prev + (1 - ratio).sqrt() * randn(generators, prior.latent_shape, device=dev)
            else:
                z = z_prev
        distances[:, i] = d
        if callback is not None:
            callback({"step": i, "t": t, "distance": d, "cosine": cosine(feat.detach(), target).cpu(),
                      "x0": img.detach(), "z": z.detach(), "recurrence": ks[i]})
        bar.update(1)
        bar.set_postfix(dist=f"{d.mean():.4g}")
    bar.close()
    with torch.no_grad():
        final = prior.decode(z).float()
        d_final = sq_l2(encoder(final), target).cpu()
    better = d_final < best_d
    best_d = torch.where(better, d_final, best_d)
    best_img = final.cpu() if best_img is None else torch.where(_view(better, best_img), final.cpu(), best_img)
    nfe = sum(ks)
    return SampleOutput(images=final.cpu(), best_images=best_img, distances=distances, best_distance=best_d,
                        nfe=nfe, backward=nfe if cfg.guided else 0, nonfinite=nonfinite)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"sampling [{desc}]", disable=not enabled, leave=False, dynamic_ncols=True)


# -- presets -----------------------------------------------------------------------------------------
PRESETS: dict[str, Callable[[], object]] = {
    # The reference configuration (authors' code): 1000 DDPM steps, w = 4, clamp k = 3,
    # K = 8 per step and K = 1000 on the first 5 steps.
    "shirahama2025": lambda: Guidance(name="shirahama2025"),
    # Same guidance on 50 trailing DDIM-ancestral steps, fewer recurrences: ~30x fewer NFE.
    "fast": lambda: Guidance(name="fast", steps=50, recurrence=4, early_steps=3, early_recurrence=20),
    # The prior alone from the same seeds: the lower bound every table needs.
    "unguided": lambda: Guidance(name="unguided", steps=50, weight=0.0, recurrence=1, early_steps=0, clamp_k=None),
}


def register_method(name: str):
    """Register a zero-argument factory returning a method (a callable with Guidance's signature)."""

    def deco(factory):
        PRESETS[name] = factory
        return factory

    return deco


def list_methods() -> list[str]:
    return sorted(PRESETS)


def get_method(name: str, **overrides):
    """A preset by name, with fields overridden (e.g. ``get_method("fast", weight=2.0)``)."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=3)
        raise KeyError(f"unknown method {name!r}; known: {list_methods()}"
                       + (f". Did you mean {close[0]!r}?" if close else ""))
    method = PRESETS[name]()
    if overrides:
        fields = {f.name for f in dataclasses.fields(method)}
        unknown = set(overrides) - fields
        if unknown:
            raise TypeError(f"method {name!r} has no option(s) {sorted(unknown)}; options: {sorted(fields)}")
        method = dataclasses.replace(method, **overrides)
    return method
