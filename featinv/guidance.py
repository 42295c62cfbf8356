"""Training-free guided diffusion for feature inversion: one step function, many presets.

Shirahama et al. (2025), "Feature Space Analysis by Guided Diffusion Model", is the reference
(preset ``shirahama2025``); DPS, FreeDoM, MPGD, Universal Guidance and TFG are presets of the
same step, following TFG's unified form (Ye et al. 2024, Alg. 1). At sampling step t, repeated
K(t) times (self-recurrence, Bansal et al. 2023):

    eps   = eps_theta(z_t, t)
    x0    = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)                  # Tweedie (DDPM Eq. 15)
    L     = loss(f(decode(x0)), f_s)                               # ||f - f_s||^2 per sample
    g     = shape(dL/dz_t)                                         # through the UNet
    eps'  = eps + w(t) g                                           # Shirahama: w = 4, rescale, clamp
    x0'   = x0 - mu(t) shape(dL/dx0), N times                      # no UNet backward (MPGD, TFG mu)
    z_{t-1} = DDIM(eps', z_t) - rho(t) g + sqrt(a_{t-1}) (x0' - x0)   # DPS / FreeDoM / TFG rho
    if k < K(t): z_t = sqrt(a_t / a_{t-1}) z_{t-1} + sqrt(1 - a_t / a_{t-1}) xi     # re-noise

shape() rescales per sample (to ||eps|| as Shirahama et al., by sqrt(L) as DPS, to the unguided
step as FreeDoM, or to unit RMS), then optionally clamps element-wise to mean ± k·std and clips
the norm. The x0 along the trajectory closest to f_s is kept as ``best``; with ``stop_cos`` a
sample stops (and keeps its best image) once its cosine reaches the threshold.

DDPM ancestral sampling is DDIM with eta = 1 on the training timesteps (Song et al. 2021, Eq. 16
with sigma_t^2 = beta~_t): diffusers' ``DDIMScheduler`` serves both and takes each sample's noise
from its own generator. Every statistic is per sample: results do not depend on the batch.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from featinv.metrics import cosine
from featinv.objectives import resolve_objective
from featinv.schedules import recurrence_counts, weight_multipliers

__all__ = ["Guidance", "SampleOutput", "PRESETS", "get_method", "list_methods", "register_method", "randn",
           "make_generators", "rescale_to", "clamp_std"]

Callback = Callable[[dict], None]
NORMS = ("none", "eps", "loss", "step", "unit")


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
    """What every method returns for a batch of B targets (tensors on CPU)."""

    images: torch.Tensor  # (B, C, H, W) final images in [0, 1]
    best_images: torch.Tensor  # (B, C, H, W) best along the trajectory (lowest distance)
    distances: torch.Tensor  # (B, S) objective (feature distance) at every step
    best_distance: torch.Tensor  # (B,)
    nfe: torch.Tensor  # (B,) prior (UNet) evaluations per sample
    backward: torch.Tensor  # (B,) backward passes through the prior per sample
    nonfinite: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (B,)


# -- gradient shaping --------------------------------------------------------------------------------
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def rescale_to(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """g * ||ref|| / ||g||, per sample (Shirahama et al. 2025: gradient scaled to the noise norm)."""
    gn = _flat(g).norm(dim=1).clamp_min(1e-12)
    return g * _view(_flat(ref).norm(dim=1) / gn, g)


def clamp_std(g: torch.Tensor, k: float) -> torch.Tensor:
    """Element-wise clamp to mean ± k·std of the sample's own gradient."""
    m, s = _flat(g).mean(dim=1), _flat(g).std(dim=1)
    return torch.clamp(g, _view(m - k * s, g), _view(m + k * s, g))


def shape_grad(g, norm: str, *, clamp_k=None, clip_norm=None, eps=None, loss=None, step=None) -> torch.Tensor:
    """Per-sample normalisation, then clamp and norm clipping (see module docstring)."""
    if norm == "eps":
        g = rescale_to(g, eps)
    elif norm == "step":
        g = rescale_to(g, step)
    elif norm == "loss":  # DPS (Chung et al. 2023, Alg. 1): zeta / ||y - A(x0)||
        g = g / _view(loss.detach().clamp_min(1e-12).sqrt(), g)
    elif norm == "unit":  # unit RMS per element
        g = g / _view(_flat(g).pow(2).mean(dim=1).sqrt().clamp_min(1e-12), g)
    if clamp_k is not None:
        g = clamp_std(g, clamp_k)
    if clip_norm is not None:
        g = g * _view((clip_norm / _flat(g).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0), g)
    return g


def _finite(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the gradient of samples where it is NaN/inf; return it and the mask of such samples."""
    bad = ~torch.isfinite(_flat(g)).all(dim=1)
    return (torch.where(_view(bad, g), torch.zeros_like(g), g) if bad.any() else g), bad


# -- the guided sampler -------------------------------------------------------------------------------
@dataclass
class Guidance:
    """A training-free guided sampler: every knob of the step function in the module docstring.

    Sampler: ``steps`` (1000 = every training timestep), ``eta`` (1 = DDPM ancestral, 0 = DDIM).
    z_t-gradient (backpropagates through the prior): ``weight`` w added to eps, ``z_weight`` rho
    subtracted from z_{t-1}; shaped by ``norm`` (none | eps | loss | step | unit), ``clamp_k``,
    ``clip_norm``. x0-gradient (no prior backward): ``x0_weight`` mu, ``x0_iters``, ``x0_norm``.
    ``sigma``, ``mc_samples``: Monte-Carlo smoothing of the loss at x0 + sigma sqrt(1-a_t) n (TFG).
    ``schedule``/``window``: per-step multiplier of w, rho and mu (see featinv.schedules).
    ``recurrence``, ``early_steps``, ``early_recurrence``, ``recurrence_window``: K(t).
    ``stop_cos``: adaptive compute: a sample stops once cos(f(x0), f_s) >= stop_cos; its final
    image is that x0-hat, and ``best_images`` still holds the best of its trajectory.
    ``objective``: loss(feature, target) -> (B,) to minimise (default ||f - f_s||^2), or a spec
    such as ``"unit:7"`` / ``{kind: activation, index: 7}`` (see featinv.objectives).
    """

    name: str = "guided"
    steps: int = 1000
    eta: float = 1.0
    weight: float = 4.0
    z_weight: float = 0.0
    norm: str = "eps"
    clamp_k: float | None = 3.0
    clip_norm: float | None = None
    x0_weight: float = 0.0
    x0_iters: int = 1
    x0_norm: str = "unit"
    sigma: float = 0.0
    mc_samples: int = 1
    schedule: str = "constant"
    window: tuple[float, float] | None = None
    recurrence: int = 8
    early_steps: int = 5
    early_recurrence: int = 1000
    recurrence_window: tuple[float, float] | None = None
    stop_cos: float | None = None
    objective: Callable | str | dict | None = None

    def __post_init__(self):
        if self.norm not in NORMS or self.x0_norm not in NORMS:
            raise ValueError(f"norm and x0_norm must be one of {NORMS}")
        if self.norm == "step" and self.weight != 0:
            raise ValueError("norm='step' scales to the unguided z-step: it applies to z_weight, not weight")
        if self.x0_norm in ("eps", "step"):
            raise ValueError("x0_norm must be 'none', 'loss' or 'unit'")

    def recurrences(self) -> list[int]:
        """K(t) for each of the ``steps`` sampling steps."""
        return recurrence_counts(self.steps, self.recurrence, self.early_steps, self.early_recurrence,
                                 self.recurrence_window)

    @property
    def z_grad(self) -> bool:
        return self.weight != 0 or self.z_weight != 0

    @property
    def guided(self) -> bool:
        return self.z_grad or self.x0_weight != 0

    def nfe(self) -> int:
        """Prior evaluations per sample when no sample stops early."""
        return sum(self.recurrences())

    def __call__(self, prior, encoder: nn.Module, target: torch.Tensor, generators: Sequence[torch.Generator],
                 *, callback: Callback | None = None, progress: bool = False) -> SampleOutput:
        return guided_sample(self, prior, encoder, target, generators, callback=callback, progress=progress)


def _scheduler(prior, steps: int):
    from diffusers import DDIMScheduler

    # x0 clipping acts on the update only (our gradient is taken on the unclipped x0-hat);
    # with use_clipped_model_output the DDIM(eta=1) step stays the DDPM posterior step.
    clip = prior.x0_range is not None
    sched = DDIMScheduler.from_config(prior.scheduler_config, clip_sample=clip,
                                      clip_sample_range=prior.x0_range or 1.0, set_alpha_to_one=True,
                                      timestep_spacing="trailing", thresholding=False,
                                      prediction_type="epsilon")  # the prior already returns eps
    sched.set_timesteps(steps, device=prior.device)
    return sched


class _Step:
    """One guided step for the active samples; the loop in ``guided_sample`` repeats it."""

    def __init__(self, cfg: Guidance, prior, encoder, sched):
        self.cfg, self.prior, self.encoder, self.sched = cfg, prior, encoder, sched
        self.loss_fn = resolve_objective(cfg.objective)

    def loss(self, x0, target, gens, a_t):
        """Objective at decode(x0) (Monte-Carlo smoothed if sigma > 0); plus features and image."""
        img = self.prior.decode(x0)
        feat = self.encoder(img)
        loss = self.loss_fn(feat, target)
        if self.cfg.sigma > 0:
            std = self.cfg.sigma * float((1 - a_t).sqrt())
            smooth = [self.loss_fn(self.encoder(self.prior.decode(x0 + std * randn(gens, x0.shape[1:], x0.device))),
                                   target) for _ in range(self.cfg.mc_samples)]
            return torch.stack(smooth).mean(0), loss, feat, img
        return loss, loss, feat, img

    def __call__(self, z, t, a_t, a_prev, mult, target, gens):
        cfg = self.cfg
        with torch.enable_grad() if cfg.z_grad else torch.no_grad():
            zt = z.detach().requires_grad_(cfg.z_grad)
            eps = self.prior.eps(zt, t).float()
            x0 = (zt - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            smooth, loss, feat, img = self.loss(x0, target, gens, a_t)
            g = bad = None
            if cfg.z_grad and mult != 0:
                (g,) = torch.autograd.grad(smooth.sum(), zt)
                g, bad = _finite(g)
        eps, x0, loss, zt = eps.detach(), x0.detach(), loss.detach(), zt.detach()
        if g is not None and cfg.weight != 0:
            eps = eps + cfg.weight * mult * shape_grad(g, cfg.norm, clamp_k=cfg.clamp_k, clip_norm=cfg.clip_norm,
                                                       eps=eps, loss=loss)
        delta0 = self.x0_guidance(x0, target, gens, a_t, mult)
        noise = randn(gens, z.shape[1:], device=z.device) if cfg.eta > 0 else None
        z_prev = self.sched.step(eps, t, zt, eta=cfg.eta, variance_noise=noise,
                                 use_clipped_model_output=True).prev_sample
        if g is not None and cfg.z_weight != 0:
            z_prev = z_prev - cfg.z_weight * mult * shape_grad(
                g, cfg.norm, clamp_k=cfg.clamp_k, clip_norm=cfg.clip_norm, eps=eps, loss=loss, step=z_prev - zt)
        if delta0 is not None:
            z_prev = z_prev + a_prev.sqrt() * delta0
        nonfinite = bad if bad is not None else torch.zeros(len(z), dtype=torch.bool, device=z.device)
        return z_prev, img.detach(), loss, feat.detach(), nonfinite, g is not None

    def x0_guidance(self, x0, target, gens, a_t, mult):
        """Delta_0 = x0' - x0 after ``x0_iters`` gradient steps on x0 (no backward through the prior)."""
        cfg = self.cfg
        if cfg.x0_weight == 0 or mult == 0:
            return None
        x = x0.clone()
        for _ in range(cfg.x0_iters):
            with torch.enable_grad():
                xg = x.requires_grad_(True)
                smooth, loss, _, _ = self.loss(xg, target, gens, a_t)
                (g,) = torch.autograd.grad(smooth.sum(), xg)
            g, _ = _finite(g)
            x = (x - cfg.x0_weight * mult * shape_grad(g, cfg.x0_norm, loss=loss.detach())).detach()
        return x - x0


def guided_sample(cfg: Guidance, prior, encoder, target, generators, *, callback=None, progress=False) -> SampleOutput:
    """Run the guided reverse process for a batch of target features ``target`` (B, D)."""
    if cfg.steps > prior.num_train_timesteps:  # e.g. a 1000-step preset on a 100-step prior
        cfg = dataclasses.replace(cfg, steps=prior.num_train_timesteps)
    sched = _scheduler(prior, cfg.steps)
    acp = prior.alphas_cumprod.float()
    dev, B = prior.device, target.shape[0]
    if len(generators) != B:
        raise ValueError(f"need one generator per target: {len(generators)} generators for {B} targets")
    target = target.to(dev).float()
    step = _Step(cfg, prior, encoder, sched)
    timesteps = [int(t) for t in sched.timesteps]
    step_ratio = prior.num_train_timesteps // cfg.steps
    ks = cfg.recurrences()
    mults = weight_multipliers(cfg.schedule, timesteps, acp, step_ratio, cfg.window)
    z = randn(generators, prior.latent_shape, device=dev)
    distances = torch.zeros(B, len(timesteps))
    best_d, best_img = torch.full((B,), math.inf), None
    nfe, backward, nonfinite = (torch.zeros(B, dtype=torch.long) for _ in range(3))
    active = torch.ones(B, dtype=torch.bool)
    final = None  # (B, C, H, W), allocated at the first decoded image
    bar = _progress(len(timesteps), progress, cfg.name)
    for i, t in enumerate(timesteps):
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            distances[:, i:] = distances[:, i - 1:i]
            break
        gens, tgt, zi = [generators[j] for j in idx], target[idx.to(dev)], z[idx.to(dev)]
        a_t = acp[t]
        a_prev = acp[t - step_ratio] if t - step_ratio >= 0 else torch.tensor(1.0, device=acp.device)
        for k in range(ks[i]):
            z_prev, img, d, feat, bad, did_backward = step(zi, t, a_t, a_prev, mults[i], tgt, gens)
            nfe[idx] += 1
            backward[idx] += int(did_backward)
            nonfinite[idx] += bad.cpu().long()
            best_d, best_img = _track_best(best_d, best_img, idx, d.cpu(), img.cpu())
            final = torch.zeros_like(best_img) if final is None else final
            if k < ks[i] - 1:  # self-recurrence: back to t with fresh noise
                ratio = a_t / a_prev
                zi = ratio.sqrt() * z_prev + (1 - ratio).sqrt() * randn(gens, prior.latent_shape, device=dev)
            else:
                zi = z_prev
        z[idx.to(dev)] = zi
        if i > 0:
            distances[:, i] = distances[:, i - 1]  # stopped samples keep their last distance
        distances[idx, i] = d.cpu()
        cos = cosine(feat, tgt).cpu()
        if cfg.stop_cos is not None:
            stop = cos >= cfg.stop_cos
            active[idx[stop]] = False
            final[idx[stop]] = img[stop].cpu()  # the x0-hat that reached the threshold
        if callback is not None:
            callback({"step": i, "t": t, "index": idx, "distance": d.cpu(), "cosine": cos, "x0": img, "z": zi,
                      "recurrence": ks[i], "weight": mults[i]})
        bar.update(1)
        bar.set_postfix(dist=f"{d.mean():.4g}", active=int(active.sum()))
    bar.close()
    done = active.nonzero().flatten()
    if len(done):
        with torch.no_grad():
            img = prior.decode(z[done.to(dev)]).float()
            d_final = step.loss_fn(encoder(img), target[done.to(dev)]).cpu()
        final[done] = img.cpu()
        best_d, best_img = _track_best(best_d, best_img, done, d_final, img.cpu())
    return SampleOutput(images=final, best_images=best_img, distances=distances, best_distance=best_d,
                        nfe=nfe, backward=backward, nonfinite=nonfinite)


def _track_best(best_d, best_img, idx, d, img):
    """Keep, per sample, the image with the lowest objective seen so far."""
    if best_img is None:
        best_img = torch.zeros(len(best_d), *img.shape[1:])
    better = d < best_d[idx]
    if better.any():
        rows = idx[better]
        best_d[rows] = d[better]
        best_img[rows] = img[better]
    return best_d, best_img


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"sampling [{desc}]", disable=not enabled, leave=False, dynamic_ncols=True)


# -- presets -----------------------------------------------------------------------------------------
PRESETS: dict[str, Callable[[], object]] = {}


def register_method(name: str):
    """Register a zero-argument factory returning a method (a callable with Guidance's signature)."""

    def deco(factory):
        PRESETS[name] = factory
        return factory

    return deco


def _preset(name: str, **kw) -> None:
    register_method(name)(lambda: Guidance(name=name, **kw))


_NO_REF = dict(weight=0.0, early_steps=0, clamp_k=None)  # switch off the reference's eps-space term
# The reference (authors' code): 1000 DDPM steps, w = 4, rescale to ||eps||, clamp k = 3,
# K = 8 per step and K = 1000 on the first 5 steps.
_preset("shirahama2025")
# The same guidance on 50 trailing DDIM-ancestral steps with fewer recurrences (~50x fewer NFE),
# with w decaying linearly to 0: with few, large steps a constant w leaves high-frequency grain
# (digits world, 32 targets: held-out ViT label agreement 84% constant vs 100% linear_decay,
# benchmarks/results/ablation_schedule.md). ``schedule: constant`` gives the reference's shape.
_preset("fast", steps=50, recurrence=4, early_steps=3, early_recurrence=20, schedule="linear_decay")
# The prior alone from the same seeds: the lower bound every table needs.
_preset("unguided", steps=50, recurrence=1, **_NO_REF)
# DPS (Chung et al. 2023, Alg. 1): z_{t-1} -= zeta grad_{z_t} L / sqrt(L), 1000 ancestral steps.
_preset("dps", z_weight=1.0, norm="loss", recurrence=1, **_NO_REF)
# FreeDoM (Yu et al. 2023, Alg. 1): z-gradient of the energy scaled to the unguided step, with
# time-travel (K = 10) over the early-middle "semantic" stage; 100 DDIM-ancestral steps.
_preset("freedom", steps=100, z_weight=1.0, norm="step", recurrence=10, recurrence_window=(0.1, 0.6), **_NO_REF)
# MPGD (He et al. 2024, Alg. 1): gradient step on x0 only -- no backpropagation through the UNet.
_preset("mpgd", steps=50, x0_weight=0.1, x0_iters=1, recurrence=1, **_NO_REF)
# Universal Guidance (Bansal et al. 2023, Alg. 1): forward guidance scaled by sqrt(1 - a_t),
# backward guidance (a few steps on x0), self-recurrence K = 4; in TFG's unified form.
_preset("ugd", steps=50, weight=4.0, norm="eps", clamp_k=None, schedule="sigma", x0_weight=0.05, x0_iters=3,
        recurrence=4, early_steps=0)
# TFG (Ye et al. 2024, Alg. 1): rho (z_t gradient), mu (x0 gradient, N_iter = 4), sigma (MC
# smoothing), N_recur = 2, "increase" schedule.
_preset("tfg", steps=50, z_weight=0.02, norm="unit", x0_weight=0.05, x0_iters=4, sigma=0.1, mc_samples=1,
        schedule="alpha", recurrence=2, **_NO_REF)


def list_methods() -> list[str]:
    _load_baselines()
    return sorted(PRESETS)


def get_method(name: str, **overrides):
    """A preset by name, with fields overridden (e.g. ``get_method("fast", weight=2.0)``)."""
    _load_baselines()
    if name not in PRESETS:
        from featinv.registry import suggest

        raise KeyError(f"unknown method {name!r}; known: {sorted(PRESETS)}.{suggest(name, PRESETS)}")
    method = PRESETS[name]()
    if overrides:
        fields = {f.name for f in dataclasses.fields(method)}
        unknown = set(overrides) - fields
        if unknown:
            raise TypeError(f"method {name!r} has no option(s) {sorted(unknown)}; options: {sorted(fields)}")
        for k in ("window", "recurrence_window"):  # YAML gives lists
            if isinstance(overrides.get(k), list):
                overrides[k] = tuple(overrides[k])
        method = dataclasses.replace(method, **overrides)
    return method


def _load_baselines() -> None:
    try:
        import featinv.baselines  # noqa: F401  (registers pixel, fourier, deepinversion)
    except ModuleNotFoundError as e:
        if e.name != "featinv.baselines":
            raise
