"""Training-free guided diffusion for feature inversion: one step function, many presets.

Shirahama et al. (2025), "Feature Space Analysis by Guided Diffusion Model", is the reference
(preset ``shirahama2025``); DPS, FreeDoM, MPGD, Universal Guidance and TFG are presets of the
same step, following TFG's unified form (Ye et al. 2024, Alg. 1). At sampling step t (next step
t', a_t = alphas_cumprod[t], a' = alphas_cumprod[t'], 1 after the last step), repeated K(t) times
(self-recurrence, Bansal et al. 2023):

    eps   = eps_theta(z_t, t | cond)
    x0    = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)                  # Tweedie (DDPM Eq. 15)
    L     = loss(f(decode(x0)), f_s)                               # ||f - f_s||^2 per sample
    g     = shape(dL/dz_t)                                         # through the UNet
    eps'  = eps + w(t) g                                           # Shirahama: w = 4, rescale, clamp
    x0'   = x0 - mu(t) shape(dL/dx0), N times                      # no UNet backward (MPGD, TFG mu)
    z_t'  = DDIM(eps', z_t) - rho(t) g + sqrt(a') (x0' - x0)       # DPS / FreeDoM / TFG rho
    if k < K(t): z_t = sqrt(a_t / a') z_t' + sqrt(1 - a_t / a') xi  # re-noise

shape() rescales per sample (to ||eps|| as Shirahama et al., by sqrt(L) as DPS, to the unguided
step as FreeDoM, or to unit RMS), then optionally clamps element-wise to mean ± k·std and clips
the norm. The x0 along the trajectory closest to f_s is kept as ``best``; with ``stop_cos`` a
sample stops (and keeps its best image) once its cosine reaches the threshold.

DDIM (Song et al. 2021, Eq. 12) with eta = 1 on the training timesteps is DDPM ancestral sampling
(sigma_t^2 = beta~_t). ``ddim_step`` computes its coefficients in float64: with a cosine schedule
a_T ~ 1e-9, and 1 - a' - sigma^2 is a difference of nearly equal numbers that float32 rounds
below zero (NaN). Every statistic is per sample: results do not depend on the batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from featinv.contract import Callback, SampleOutput, per_sample, progress_bar, randn
from featinv.metrics import cosine
from featinv.objectives import resolve_objective
from featinv.priors import CLAMPS
from featinv.schedules import WEIGHT_SCHEDULES, recurrence_counts, weight_multipliers

__all__ = ["Guidance", "guided_sample", "ddim_step", "rescale_to", "clamp_std", "shape_grad", "NORMS"]

NORMS = ("none", "eps", "loss", "step", "unit")


# -- gradient shaping --------------------------------------------------------------------------------
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def rescale_to(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """g * ||ref|| / ||g||, per sample (Shirahama et al. 2025: gradient scaled to the noise norm)."""
    gn = _flat(g).norm(dim=1).clamp_min(1e-12)
    return g * per_sample(_flat(ref).norm(dim=1) / gn, g)


def clamp_std(g: torch.Tensor, k: float) -> torch.Tensor:
    """Element-wise clamp to mean ± k·std of the sample's own gradient."""
    m, s = _flat(g).mean(dim=1), _flat(g).std(dim=1)
    return torch.clamp(g, per_sample(m - k * s, g), per_sample(m + k * s, g))


def shape_grad(g, norm: str, *, clamp_k=None, clip_norm=None, eps=None, loss=None, step=None) -> torch.Tensor:
    """Per-sample normalisation, then clamp and norm clipping (see module docstring)."""
    if norm == "eps":
        g = rescale_to(g, eps)
    elif norm == "step":
        g = rescale_to(g, step)
    elif norm == "loss":  # DPS (Chung et al. 2023, Alg. 1): zeta / ||y - A(x0)||
        g = g / per_sample(loss.detach().clamp_min(1e-12).sqrt(), g)
    elif norm == "unit":  # unit RMS per element
        g = g / per_sample(_flat(g).pow(2).mean(dim=1).sqrt().clamp_min(1e-12), g)
    if clamp_k is not None:
        g = clamp_std(g, clamp_k)
    if clip_norm is not None:
        g = g * per_sample((clip_norm / _flat(g).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0), g)
    return g


def _finite(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the gradient of samples where it is NaN/inf; return it and the mask of such samples."""
    bad = ~torch.isfinite(_flat(g)).all(dim=1)
    return (torch.where(per_sample(bad, g), torch.zeros_like(g), g) if bad.any() else g), bad


# -- the DDIM / DDPM update -------------------------------------------------------------------------
def ddim_step(z: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float, eta: float,
              noise: torch.Tensor | None = None, x0_range: float | None = None) -> torch.Tensor:
    """z_{t'} from z_t and eps (Song et al. 2021, Eq. 12); eta = 1 is DDPM's posterior sample.

    ``x0_range`` clips x0-hat in the update and recomputes eps from it, as DDPM's ``clip_sample``
    with diffusers' ``use_clipped_model_output``. Coefficients are float64 (see module docstring).
    """
    a_t, a_prev = float(a_t), float(a_prev)
    x0 = (z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if x0_range is not None:
        x0 = x0.clamp(-x0_range, x0_range)
        eps = (z - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    z_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        z_prev = z_prev + sigma * noise
    return z_prev


# -- the guided sampler -------------------------------------------------------------------------------
@dataclass
class Guidance:
    """A training-free guided sampler: every knob of the step function in the module docstring.

    Sampler: ``steps`` (1000 = every training timestep of a 1000-step prior), ``eta`` (1 = DDPM
    ancestral, 0 = DDIM). z_t-gradient (backpropagates through the prior): ``weight`` w added to
    eps, ``z_weight`` rho subtracted from z_{t'}; shaped by ``norm`` (none | eps | loss | step |
    unit), ``clamp_k``, ``clip_norm``. x0-gradient (no prior backward): ``x0_weight`` mu,
    ``x0_iters``, ``x0_norm``. ``sigma``, ``mc_samples``: Monte-Carlo smoothing of the loss at
    x0 + sigma sqrt(1-a_t) n (TFG). ``schedule``/``window``: per-step multiplier of w, rho and mu
    (``featinv.schedules``). ``recurrence``, ``early_steps``, ``early_recurrence``,
    ``recurrence_window``: K(t). ``stop_cos``: a sample stops once cos(f(x0), f_s) >= stop_cos; its
    final image is that x0-hat. ``decode_clamp``: how the decoded image is clamped to [0, 1] inside
    the loss (``hard``, zero gradient on saturated pixels, as the reference; ``straight_through``).
    ``objective``: loss(feature, target) -> (B,) to minimise (default ||f - f_s||^2), or a spec
    such as ``"unit:7"`` (``featinv.objectives``).
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
    decode_clamp: str = "hard"
    objective: object = None

    def __post_init__(self):
        for k in ("window", "recurrence_window"):  # YAML gives lists
            if isinstance(getattr(self, k), list):
                setattr(self, k, tuple(getattr(self, k)))
        _check(self)
        self.loss_fn = resolve_objective(self.objective)

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

    def __call__(self, prior, encoder: nn.Module, target: torch.Tensor, generators: Sequence[torch.Generator], *,
                 cond: torch.Tensor | None = None, callback: Callback | None = None,
                 progress: bool = False) -> SampleOutput:
        return guided_sample(self, prior, encoder, target, generators, cond=cond, callback=callback,
                             progress=progress)


def _check(g: Guidance) -> None:
    """Refuse, at construction, every setting that cannot give a correct result."""
    def bad(field, allowed):
        raise ValueError(f"method {g.name!r}: {field}={getattr(g, field)!r} is invalid; {allowed}")

    def finite(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    for k in ("steps", "recurrence", "early_recurrence", "x0_iters", "mc_samples"):
        v = getattr(g, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            bad(k, "it must be an integer >= 1")
    if not isinstance(g.early_steps, int) or g.early_steps < 0:
        bad("early_steps", "it must be an integer >= 0")
    if not finite(g.eta) or not 0 <= g.eta <= 1:
        bad("eta", "it must be in [0, 1] (1 = DDPM ancestral, 0 = DDIM)")
    for k in ("weight", "z_weight", "x0_weight", "sigma"):
        if not finite(getattr(g, k)) or getattr(g, k) < 0:
            bad(k, "it must be a finite number >= 0")
    for k in ("clamp_k", "clip_norm"):
        v = getattr(g, k)
        if v is not None and (not finite(v) or v <= 0):
            bad(k, "it must be a finite number > 0, or null to switch it off")
    if g.norm not in NORMS:
        bad("norm", f"choose from {NORMS}")
    if g.x0_norm not in ("none", "loss", "unit"):
        bad("x0_norm", "choose from ('none', 'loss', 'unit')")
    if g.norm == "step" and g.weight != 0:
        bad("norm", "norm='step' scales to the unguided z-step: it applies to z_weight, not weight (set weight: 0)")
    if g.schedule not in WEIGHT_SCHEDULES:
        bad("schedule", f"choose from {WEIGHT_SCHEDULES}")
    for k in ("window", "recurrence_window"):
        v = getattr(g, k)
        if v is not None and not (len(v) == 2 and all(finite(p) for p in v) and 0 <= v[0] <= v[1] <= 1):
            bad(k, "it must be [p0, p1] with 0 <= p0 <= p1 <= 1 (progress from the first to the last step)")
    if g.stop_cos is not None and (not finite(g.stop_cos) or not -1 < g.stop_cos <= 1):
        bad("stop_cos", "it must be in (-1, 1], or null")
    if g.decode_clamp not in CLAMPS:
        bad("decode_clamp", f"choose from {CLAMPS}")


class _Step:
    """One guided step for the active samples; the loop in ``guided_sample`` repeats it."""

    def __init__(self, cfg: Guidance, prior, encoder):
        self.cfg, self.prior, self.encoder, self.loss_fn = cfg, prior, encoder, cfg.loss_fn

    def loss(self, x0, target, gens, a_t):
        """Objective at decode(x0) (Monte-Carlo smoothed if sigma > 0); plus features and image."""
        decode = lambda x: self.prior.decode(x, clamp=self.cfg.decode_clamp)  # noqa: E731
        img = decode(x0)
        feat = self.encoder(img)
        loss = self.loss_fn(feat, target)
        if self.cfg.sigma > 0:
            std = self.cfg.sigma * math.sqrt(1 - a_t)
            smooth = [self.loss_fn(self.encoder(decode(x0 + std * randn(gens, x0.shape[1:], x0.device))), target)
                      for _ in range(self.cfg.mc_samples)]
            return torch.stack(smooth).mean(0), loss, feat, img
        return loss, loss, feat, img

    def __call__(self, z, t, a_t, a_prev, mult, target, gens, cond):
        cfg = self.cfg
        with torch.enable_grad() if cfg.z_grad else torch.no_grad():
            zt = z.detach().requires_grad_(cfg.z_grad)
            eps = self.prior.eps(zt, t, cond).float()
            x0 = (zt - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)  # Tweedie
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
        z_prev = ddim_step(zt, eps, a_t, a_prev, cfg.eta, noise, self.prior.x0_range)
        if g is not None and cfg.z_weight != 0:
            z_prev = z_prev - cfg.z_weight * mult * shape_grad(
                g, cfg.norm, clamp_k=cfg.clamp_k, clip_norm=cfg.clip_norm, eps=eps, loss=loss, step=z_prev - zt)
        if delta0 is not None:
            z_prev = z_prev + math.sqrt(a_prev) * delta0
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


def guided_sample(cfg: Guidance, prior, encoder, target, generators, *, cond=None, callback=None,
                  progress=False) -> SampleOutput:
    """Run the guided reverse process for a batch of target features ``target`` (B, D)."""
    T = prior.num_train_timesteps
    if cfg.steps > T:
        raise ValueError(f"method {cfg.name!r}: steps={cfg.steps} exceeds the prior's {T} training timesteps; "
                         f"set steps <= {T}")
    dev, B = prior.device, target.shape[0]
    if len(generators) != B:
        raise ValueError(f"need one generator per target: {len(generators)} generators for {B} targets")
    if cond is not None and cond.shape[0] != B:
        raise ValueError(f"cond has {cond.shape[0]} rows for {B} targets")
    target = target.to(dev).float()
    acp = prior.alphas_cumprod.double().cpu()
    timesteps = prior.sampling_timesteps(cfg.steps)
    alphas = [float(acp[t]) for t in timesteps] + [1.0]  # a' after the last step is 1 (x0 itself)
    step = _Step(cfg, prior, encoder)
    ks = cfg.recurrences()
    mults = weight_multipliers(cfg.schedule, timesteps, acp, cfg.window)
    z = randn(generators, prior.latent_shape, device=dev)
    distances = torch.zeros(B, len(timesteps))
    best_d, best_img = torch.full((B,), math.inf), None
    nfe, backward, nonfinite = (torch.zeros(B, dtype=torch.long) for _ in range(3))
    active = torch.ones(B, dtype=torch.bool)
    final = None  # (B, C, H, W), allocated at the first decoded image
    bar = progress_bar(len(timesteps), progress, cfg.name)
    for i, t in enumerate(timesteps):
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            distances[:, i:] = distances[:, i - 1:i]
            break
        gens, tgt, zi = [generators[j] for j in idx], target[idx.to(dev)], z[idx.to(dev)]
        ci = cond[idx.to(cond.device)] if cond is not None else None
        a_t, a_prev = alphas[i], alphas[i + 1]
        for k in range(ks[i]):
            z_prev, img, d, feat, bad, did_backward = step(zi, t, a_t, a_prev, mults[i], tgt, gens, ci)
            nfe[idx] += 1
            backward[idx] += int(did_backward)
            nonfinite[idx] += bad.cpu().long()
            best_d, best_img = _track_best(best_d, best_img, idx, d.cpu(), img.cpu())
            final = torch.zeros_like(best_img) if final is None else final
            if k < ks[i] - 1:  # self-recurrence: back to t with fresh noise
                ratio = a_t / a_prev
                zi = math.sqrt(ratio) * z_prev + math.sqrt(1 - ratio) * randn(gens, prior.latent_shape, device=dev)
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
                      "recurrence": ks[i], "weight": cfg.weight * mults[i], "loss": d.cpu()})
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
    """Keep, per sample, the image with the lowest objective seen so far (NaN never counts as better)."""
    if best_img is None:
        best_img = torch.zeros(len(best_d), *img.shape[1:])
    better = d < best_d[idx]
    if better.any():
        rows = idx[better]
        best_d[rows] = d[better]
        best_img[rows] = img[better]
    return best_d, best_img
