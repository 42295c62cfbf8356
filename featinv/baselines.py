"""Optimisation baselines: feature inversion / activation maximisation by gradient descent on the image.

Three classic methods, each a dataclass with the method interface of ``featinv.guidance``
(``featinv.contract.Method``), listed in ``featinv.methods``:

* ``pixel``: Mahendran & Vedaldi (2015), "Understanding Deep Image Representations by Inverting
  Them": pixels optimised under an alpha-norm and a TV^beta regulariser.
* ``fourier``: Olah et al. (2017), "Feature Visualization" (Lucid / Lucent): a 1/f-scaled Fourier
  parametrisation with decorrelated colour and random transforms every step.
* ``deepinversion``: Yin et al. (2020), "Dreaming to Distill": BatchNorm statistics matching + TV
  and L2 priors, with random jitter and flips.

Shared conventions.

* The diffusion prior is not used, except for the image shape: images are (C, H, W) =
  ``prior.decode(zeros(1, *prior.latent_shape)).shape[1:]`` (one VAE decode for a latent prior),
  on ``prior.device``, in [0, 1].
* ``steps`` = optimisation steps (one Adam step each). ``objective`` (default ``None``) replaces the
  method's feature-matching term by any ``featinv.objectives`` objective (a spec string/dict, an
  ``Objective`` or a callable ``(feat, target) -> (B,)``), e.g. ``Activation(7)`` for activation
  maximisation; the regularisers stay.
* ``distances`` (B, S): at every step, the tracked quantity of the image *before* that step's
  update: ||f(x) - f_s||^2 when ``objective`` is None (whatever normalised/regularised loss the
  method optimises), else the objective's value. ``best_images`` = lowest tracked value along the
  run, the final image included (evaluated once more after the last step, not counted in ``nfe``).
* ``nfe`` (B,) = encoder forward passes per sample (a baseline evaluates no prior), ``backward`` (B,)
  = backward passes (through the encoder) per sample. Pixel:
  nfe = backward = steps. Fourier and DeepInversion optimise the loss of a randomly *transformed*
  image; with ``track_clean=True`` (default) the distance is measured on the untransformed image by
  a second, gradient-free forward pass, so nfe = 2 * steps (backward = steps); with
  ``track_clean=False`` the transformed image's distance is recorded and nfe = steps.
* Per-sample everything: all randomness comes from the per-sample generators via
  ``featinv.contract.randn`` (uniforms are Phi(normal)), losses are per sample and summed before
  ``backward`` (so each sample's gradient is its own), and Adam is element-wise. A target's result
  does not depend on its batch. A sample whose gradient is NaN/inf has that step's gradient zeroed
  (counted in ``nonfinite``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from featinv.contract import NotApplicableError, SampleOutput, per_sample, progress_bar, randn
from featinv.metrics import cosine
from featinv.objectives import FeatureMatch, resolve_objective

__all__ = ["PixelInversion", "FourierVisualization", "DeepInversion", "NotApplicableError", "image_shape",
           "alpha_norm", "tv_beta", "fourier_image", "COLOR_CORRELATION_SVD_SQRT"]


# -- helpers ---------------------------------------------------------------------------------------
def image_shape(prior) -> tuple[int, int, int]:
    """(C, H, W) of the prior's images: one decode of a zero latent."""
    with torch.no_grad():
        img = prior.decode(torch.zeros(1, *prior.latent_shape, device=prior.device))
    return tuple(int(s) for s in img.shape[1:])


def _uniform(generators, n: int, device) -> torch.Tensor:
    """(B, n) uniforms in (0, 1) from each sample's own generator (Phi of standard normals)."""
    z = randn(generators, (n,), device=device)
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def alpha_norm(x: torch.Tensor, alpha: float, center: float = 0.5) -> torch.Tensor:
    """sum |x - center|^alpha per sample (Mahendran & Vedaldi's alpha-norm of the centred image)."""
    return (x - center).abs().pow(alpha).flatten(1).sum(dim=1)


def tv_beta(x: torch.Tensor, beta: float, eps: float = 1e-8) -> torch.Tensor:
    """sum_ij ((x_i,j+1 - x_ij)^2 + (x_i+1,j - x_ij)^2)^(beta/2) per sample (TV^beta, M&V Eq. 3).

    Differences past the last row/column count as 0, so every pixel enters. For beta < 2 an ``eps``
    inside the power keeps the gradient finite at flat regions.
    """
    dx2 = F.pad((x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2), (0, 1, 0, 0))  # 0 past the last column
    dy2 = F.pad((x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2), (0, 0, 0, 1))  # 0 past the last row
    d2 = dx2 + dy2
    return (d2 if beta == 2 else (d2 + eps).pow(beta / 2)).flatten(1).sum(dim=1)


def _tv_deepinversion(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepInversion's image priors: (L2 TV, L1 TV) per sample over 4 neighbour directions."""
    diffs = [x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:]]
    l2 = sum(d.flatten(1).norm(dim=1) for d in diffs)
    l1 = sum(d.flatten(1).abs().mean(dim=1) for d in diffs)
    return l2, l1


def _encoder_input(encoder, x: torch.Tensor) -> torch.Tensor:
    pre = getattr(encoder, "preprocess", None)
    return pre(x) if pre is not None else x


def _fit_encoder(encoder, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Transformed images may be larger (padding); resize back unless the encoder resizes itself."""
    if getattr(encoder, "input_size", None) is None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x


# -- the shared optimisation loop --------------------------------------------------------------------
def _optimise(name: str, steps: int, objective, encoder, target: torch.Tensor, param: torch.Tensor,
              render: Callable[[torch.Tensor], torch.Tensor],
              step_loss: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]], *, lr: float,
              betas=(0.9, 0.999), lr_at: Callable[[int], float] | None = None,
              project: Callable[[torch.Tensor], None] | None = None, track_clean: bool = False,
              transformed: bool = False, callback=None, progress: bool = False) -> SampleOutput:
    """Adam on ``param``; ``render(param)`` -> images in [0, 1]; ``step_loss(img, i)`` -> (loss (B,), feat)."""
    track = resolve_objective(objective)  # what ``distances`` records: ||f - f_s||^2 by default
    B = target.shape[0]
    opt = torch.optim.Adam([param], lr=lr, betas=tuple(betas))
    distances = torch.zeros(B, steps)
    best_d = torch.full((B,), math.inf)
    best_img = None
    nonfinite = torch.zeros(B, dtype=torch.long)
    clean = transformed and track_clean
    bar = progress_bar(steps, progress, name)

    def keep_best(d, img):
        nonlocal best_d, best_img
        better = d < best_d
        if best_img is None:
            best_img = img.detach().cpu().clone()
        if better.any():
            best_d = torch.where(better, d, best_d)
            best_img = torch.where(per_sample(better, best_img), img.detach().cpu(), best_img)

    with torch.enable_grad():
        for i in range(steps):
            if lr_at is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_at(i)
            opt.zero_grad(set_to_none=True)
            img = render(param)
            loss, feat = step_loss(img, i)
            loss.sum().backward()
            g = param.grad
            bad = ~torch.isfinite(g.flatten(1)).all(dim=1) | ~torch.isfinite(loss.detach())
            if bad.any():  # one sample's NaN never reaches the others (nor its own image)
                param.grad = torch.where(per_sample(bad, g), torch.zeros_like(g), g)
                nonfinite += bad.cpu().long()
            with torch.no_grad():
                f_track = encoder(img) if clean else feat.detach()
                d = track(f_track, target).detach().float().cpu()
            distances[:, i] = d
            keep_best(d, img)
            if callback is not None:
                callback({"step": i, "t": None, "index": torch.arange(B), "distance": d,
                          "cosine": cosine(f_track.flatten(1), target).cpu(), "x0": img.detach().clone(),
                          "z": param.detach().clone(), "recurrence": 1, "weight": opt.param_groups[0]["lr"],
                          "loss": loss.detach().cpu()})
            opt.step()
            if project is not None:
                with torch.no_grad():
                    project(param)
            bar.update(1)
            bar.set_postfix(dist=f"{d.mean():.4g}")
    bar.close()
    with torch.no_grad():
        final = render(param).detach()
        d_final = track(encoder(final), target).detach().float().cpu()
    keep_best(d_final, final)
    n = 2 * steps if clean else steps
    return SampleOutput(images=final.cpu(), best_images=best_img, distances=distances, best_distance=best_d,
                        nfe=torch.full((B,), n, dtype=torch.long), backward=torch.full((B,), steps, dtype=torch.long),
                        nonfinite=nonfinite)


def _check(method) -> None:
    """Refuse, at construction, settings that cannot give a correct result (every numeric field)."""
    for f in dataclasses.fields(method):
        v = getattr(method, f.name)
        nums = v if isinstance(v, (tuple, list)) else [v]
        for x in nums:
            if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isfinite(x):
                raise ValueError(f"method {method.name!r}: {f.name}={v!r} is invalid; it must be finite")
    if not isinstance(method.steps, int) or method.steps < 1:
        raise ValueError(f"method {method.name!r}: steps={method.steps!r} is invalid; it must be an integer >= 1")
    if not method.lr > 0:
        raise ValueError(f"method {method.name!r}: lr={method.lr!r} is invalid; it must be > 0")
    for k, allowed in (("init", ("noise", "constant")), ("param", ("clamp", "sigmoid"))):
        if hasattr(method, k) and getattr(method, k) not in allowed:
            raise ValueError(f"method {method.name!r}: {k}={getattr(method, k)!r} is invalid; choose from {allowed}")


def _prepare(name: str, prior, target, generators, cond=None) -> tuple[torch.device, torch.Tensor, tuple[int, int, int]]:
    if cond is not None:
        raise NotApplicableError(f"{name} optimises pixels and uses no diffusion prior: it takes no `cond`")
    B = target.shape[0]
    if len(generators) != B:
        raise ValueError(f"need one generator per target: {len(generators)} generators for {B} targets")
    dev = prior.device
    return dev, target.to(dev).float(), image_shape(prior)


# -- Mahendran & Vedaldi (2015) ------------------------------------------------------------------------
@dataclass
class PixelInversion:
    """Mahendran & Vedaldi (2015), "Understanding Deep Image Representations by Inverting Them".

    Minimises, per sample, over the image x in [0, 1]^(C, H, W)::

        C_loss ||f(x) - f_s||^2 / ||f_s||^2
          + alpha_weight  * sum |x - 1/2|^alpha / (H W B^alpha)                         # R_alpha
          + tv_weight     * sum ((dx)^2 + (dy)^2)^(beta/2) / (H W V^beta)               # R_TV^beta

    Paper defaults: alpha = 6, beta = 2, the normalised loss ||f - f_s||^2/||f_s||^2, and the
    regulariser weights normalised by the image size and the pixel range ("balancing the different
    terms": lambda_alpha = 1/(H W B^alpha), lambda_TV = 1/(H W V^beta), so that each regulariser is
    about 1 when pixels span the natural range [-B, B] and finite differences are about V; the
    journal version (IJCV 2016) uses V = B / 6.5 and a loss weight C chosen per layer).

    Adapted to [0, 1] images: the image is centred at 1/2, B = ``bound`` = 0.5 (the whole range,
    as B = 128 is for [0, 255] images), V = ``tv_bound`` = B / 6.5. ``alpha_weight`` = ``tv_weight``
    = 1 multiply the normalised regularisers and ``loss_weight`` C = 100 the normalised loss
    (featinv's choice; the paper tunes C per layer; how it was chosen: docs/design.md).

    Optimiser: Adam (the paper uses momentum SGD), ``lr`` 0.05, ``steps`` 300. ``param``:
    ``"clamp"`` (default) optimises the pixels and projects them onto [0, 1] after every step
    (a hard box, the alpha-norm keeping pixels off the bounds, as in the paper); ``"sigmoid"``
    optimises logits u with x = sigmoid(u). ``init``: ``"noise"`` (1/2 + ``init_std`` N(0, 1) from the
    sample's generator, clamped) or ``"constant"`` (grey 1/2: the result depends on the target only).

    ``objective``: None = the normalised feature loss above; else that objective replaces it.
    """

    name: str = "pixel"
    steps: int = 300
    lr: float = 0.05
    init: str = "noise"
    init_std: float = 0.1
    param: str = "clamp"
    alpha: float = 6.0
    beta: float = 2.0
    bound: float = 0.5
    tv_bound: float | None = None  # None: bound / 6.5
    loss_weight: float = 100.0
    alpha_weight: float = 1.0
    tv_weight: float = 1.0
    objective: object = None

    def __post_init__(self):
        _check(self)

    def __call__(self, prior, encoder: nn.Module, target: torch.Tensor, generators: Sequence[torch.Generator],
                 *, cond=None, callback=None, progress: bool = False) -> SampleOutput:
        dev, target, (C, H, W) = _prepare(self.name, prior, target, generators, cond)
        B = target.shape[0]
        if self.init == "noise":
            x0 = (0.5 + self.init_std * randn(generators, (C, H, W), device=dev)).clamp(0, 1)
        elif self.init == "constant":
            x0 = torch.full((B, C, H, W), 0.5, device=dev)
        else:
            raise ValueError(f"{self.name}: init must be 'noise' or 'constant', got {self.init!r}")
        if self.param == "clamp":
            param, render = x0.clone().requires_grad_(True), (lambda p: p)

            def project(p):
                p.clamp_(0, 1)
        elif self.param == "sigmoid":
            param, render, project = torch.logit(x0.clamp(1e-3, 1 - 1e-3)).requires_grad_(True), torch.sigmoid, None
        else:
            raise ValueError(f"{self.name}: param must be 'clamp' or 'sigmoid', got {self.param!r}")
        data = resolve_objective(self.objective, default=FeatureMatch(relative=True))
        tv_bound = self.tv_bound if self.tv_bound is not None else self.bound / 6.5
        lam_a = self.alpha_weight / (H * W * self.bound ** self.alpha)
        lam_tv = self.tv_weight / (H * W * tv_bound ** self.beta)

        def step_loss(img, _i):
            feat = encoder(img)
            loss = self.loss_weight * data(feat, target)
            if self.alpha_weight:
                loss = loss + lam_a * alpha_norm(img, self.alpha)
            if self.tv_weight:
                loss = loss + lam_tv * tv_beta(img, self.beta)
            return loss, feat

        return _optimise(self.name, self.steps, self.objective, encoder, target, param, render, step_loss,
                         lr=self.lr, project=project, callback=callback, progress=progress)


# -- Olah et al. (2017), Lucid ------------------------------------------------------------------------------
# Lucid's color_correlation_svd_sqrt (ImageNet colour correlations, square root via SVD).
COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR_NORMALIZED = COLOR_CORRELATION_SVD_SQRT / COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()


def _spectrum_scale(h: int, w: int, decay_power: float) -> torch.Tensor:
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    freqs = (fx ** 2 + fy ** 2).sqrt()
    return 1.0 / freqs.clamp_min(1.0 / max(h, w)) ** decay_power  # (h, w // 2 + 1)


def fourier_image(spectrum: torch.Tensor, size: tuple[int, int], decay_power: float = 1.0,
                  decorrelate: bool = True) -> torch.Tensor:
    """Lucid's ``fft_image`` + ``to_valid_rgb``: spectrum (B, C, h, w//2+1, 2) -> image (B, C, h, w) in (0, 1).

    image = irfft2(spectrum * 1/max(|freq|, 1/max(h, w))^decay_power, orthonormal) / 4, then the
    decorrelated-colour map (3 channels only) and a sigmoid.
    """
    h, w = size
    scale = _spectrum_scale(h, w, decay_power).to(spectrum.device)
    spec = torch.view_as_complex(spectrum.contiguous()) * scale
    img = torch.fft.irfft2(spec, s=(h, w), norm="ortho") / 4.0  # Lucid's "magic" 4
    if decorrelate and img.shape[1] == 3:
        img = torch.einsum("ij,bjhw->bihw", _COLOR_NORMALIZED.to(img), img)
    return torch.sigmoid(img)


def _lucid_transforms(img: torch.Tensor, u: torch.Tensor, pad: int, jitter: float, scale: Sequence[float],
                      rotate: float, jitter2: float, pad_value: float = 0.5) -> torch.Tensor:
    """Pad with ``pad_value`` (Lucid: grey), then one differentiable per-sample affine warp: jitter,
    scale, rotate, jitter.

    ``u`` (B, 6) uniforms. Lengths in pixels (jitters are continuous shifts, bilinear)."""
    if pad > 0:
        img = F.pad(img, (pad, pad, pad, pad), value=pad_value)
    B, _, H, W = img.shape
    tx1, ty1 = (2 * u[:, 0] - 1) * jitter, (2 * u[:, 1] - 1) * jitter
    s = scale[0] + (scale[1] - scale[0]) * u[:, 2]
    th = torch.deg2rad((2 * u[:, 3] - 1) * rotate)
    tx2, ty2 = (2 * u[:, 4] - 1) * jitter2, (2 * u[:, 5] - 1) * jitter2
    cos, sin = th.cos(), th.sin()
    # Output pixel p -> input pixel q = R(th) (p - t2) / s - t1 (centred pixel coordinates), then to
    # the [-1, 1] coordinates of affine_grid: q_n = D^-1 q with D = diag(W/2, H/2).
    a = torch.stack([torch.stack([cos, -sin * H / W], 1), torch.stack([sin * W / H, cos], 1)], 1) / s.view(-1, 1, 1)
    t2n = torch.stack([2 * tx2 / W, 2 * ty2 / H], 1)
    t1n = torch.stack([2 * tx1 / W, 2 * ty1 / H], 1)
    b = -(a @ t2n.unsqueeze(-1)).squeeze(-1) - t1n
    theta = torch.cat([a, b.unsqueeze(-1)], dim=2).to(img.dtype)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class FourierVisualization:
    """Olah, Mordvintsev & Schubert (2017), "Feature Visualization" (Distill), as in Lucid/Lucent.

    The image is parametrised by a Fourier spectrum per sample and channel, initialised to
    ``sd`` N(0, 1) = 0.01 N(0, 1), scaled by 1/f^``decay_power`` (1/max(|f|, 1/max(H, W)), i.e. white
    in pixel space at init is replaced by natural-image-like pink noise), inverse-FFT'd (ortho) and
    divided by 4; for 3-channel images the channels are mixed by Lucid's
    ``color_correlation_svd_sqrt`` (normalised by its largest column norm), then a sigmoid maps to
    (0, 1). Every step the image goes through Lucid's ``standard_transforms`` scaled to the image
    size (Lucid's values are for 128 px): padding ``pad`` = 12/128 of the side with ``pad_value``
    (Lucid's grey 0.5), jitter
    ``jitter`` = 8/128, scale uniform in ``scale`` = (0.9, 1.1), rotation uniform in
    +-``rotate`` = 10 degrees, jitter ``jitter2`` = 4/128, done as one per-sample ``affine_grid`` +
    bilinear ``grid_sample`` (continuous shifts/angles instead of Lucid's integer lists), drawn from
    the sample's generator. Adam, ``lr`` 0.05, ``steps`` 512 (Lucid's ``render_vis`` default).

    Loss: the objective on the transformed image, ||f(T(x)) - f_s||^2 by default (``objective``).
    The padded image is larger than x; ``fit`` says how it is brought back to (H, W):
    ``"crop"`` (default: the central (H, W), scale kept) or ``"resize"`` (bilinear, which also
    shrinks the content by H/(H + 2 pad): the encoder never sees x at its own scale, and the final,
    untransformed image matches the target less well: on 32 validation digits, mean final cosine
    0.955 with resize, 0.995 with crop; benchmarks/results/peers_val.md); an encoder with its own
    ``input_size`` then resizes as usual.
    """

    name: str = "fourier"
    steps: int = 512
    lr: float = 0.05
    sd: float = 0.01
    decay_power: float = 1.0
    decorrelate: bool = True
    transforms: bool = True
    pad: float = 12 / 128
    jitter: float = 8 / 128
    scale: tuple[float, float] = (0.9, 1.1)
    rotate: float = 10.0
    jitter2: float = 4 / 128
    pad_value: float = 0.5
    fit: str = "crop"
    track_clean: bool = True
    objective: object = None

    def __post_init__(self):
        _check(self)
        if self.fit not in ("resize", "crop"):
            raise ValueError(f"method {self.name!r}: fit={self.fit!r} is invalid; choose from ('resize', 'crop')")

    def __call__(self, prior, encoder: nn.Module, target: torch.Tensor, generators: Sequence[torch.Generator],
                 *, cond=None, callback=None, progress: bool = False) -> SampleOutput:
        dev, target, (C, H, W) = _prepare(self.name, prior, target, generators, cond)
        param = (self.sd * randn(generators, (C, H, W // 2 + 1, 2), device=dev)).requires_grad_(True)
        data = resolve_objective(self.objective)
        side = max(H, W)
        pad = int(round(self.pad * side))

        def render(p):
            return fourier_image(p, (H, W), self.decay_power, self.decorrelate)

        def step_loss(img, _i):
            x = img
            if self.transforms:
                u = _uniform(generators, 6, dev)
                x = _lucid_transforms(img, u, pad, self.jitter * side, self.scale, self.rotate, self.jitter2 * side,
                                      self.pad_value)
                if self.fit == "crop" and pad > 0:
                    x = x[:, :, pad:pad + H, pad:pad + W]
                x = _fit_encoder(encoder, x, (H, W))
            feat = encoder(x)
            return data(feat, target), feat

        return _optimise(self.name, self.steps, self.objective, encoder, target, param, render, step_loss,
                         lr=self.lr, track_clean=self.track_clean, transformed=self.transforms,
                         callback=callback, progress=progress)


# -- Yin et al. (2020), DeepInversion ------------------------------------------------------------------------
def _batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None]


@dataclass
class DeepInversion:
    """Yin et al. (2020), "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion".

    Minimises, per sample, on a randomly jittered (circular shift by up to ``jitter`` = 30/224 of the
    side, as their 30 px at 224) and flipped (p = 1/2, ``flip``) view x' of the image x::

        main_weight * L_main(f(x'))                                               # default: ||f - f_s||^2/||f_s||^2
          + bn_weight * sum_l m_l (||mu_l(x') - running_mean_l||_2 + ||var_l(x') - running_var_l||_2)
          + tv_l2_weight * TV_l2(x') + tv_l1_weight * TV_l1(x') + l2_weight * ||x'||_2

    over every ``BatchNorm2d`` of ``encoder.model`` that runs before the encoder's layer (forward
    pre-hooks on the BN inputs), with m_1 = ``first_bn_weight`` = 10 for the first BN layer and 1
    for the others. **Per-sample statistics**: the paper uses the statistics of the whole batch
    (mean/var over N, H, W); here mu_l and var_l (biased) are over each sample's own spatial positions
    (H, W), so that a target's result does not depend on the batch it is in. TV_l2 is the sum of the
    L2 norms of the image differences in 4 directions, TV_l1 their mean absolute value; the TV and L2
    priors act on the encoder's input (after its preprocessing), as in the paper.

    Defaults from the authors' ImageNet code: ``bn_weight`` (r_feature) 0.05, ``first_bn_weight`` 10,
    ``tv_l2_weight`` 1e-4, ``tv_l1_weight`` 0, ``l2_weight`` 1e-5, Adam betas (0.5, 0.9), a
    cosine learning-rate schedule with linear warm-up over the first ``warmup`` = 5% of the steps
    (100 of 2,000), ``steps`` 2,000. The paper's lr 0.25 is on normalised inputs (std ~0.226), so
    ``lr`` = 0.05 on [0, 1] pixels; pixels are clipped to [0, 1] after every step (as their
    ``clip``), from 1/2 + ``init_std`` N(0, 1) (their N(0, 1) init in normalised space, 0.225 in
    pixels). Flips make the loss see x and its mirror image, so results tend to be left-right
    symmetric (right for natural images, not for digits: ``flip=False`` there). The paper's main
    loss is the cross-entropy of a target class; for feature inversion it
    is the normalised feature loss (about 1 at the start, like the cross-entropy's scale);
    ``objective`` replaces it (e.g. ``ClassLogit(k)``).

    Raises ``NotApplicableError`` if the model has no BatchNorm2d layer (or none runs before the
    encoder's layer).
    """

    name: str = "deepinversion"
    steps: int = 2000
    lr: float = 0.05
    betas: tuple[float, float] = (0.5, 0.9)
    warmup: float = 0.05
    cosine_lr: bool = True
    init_std: float = 0.225
    main_weight: float = 1.0
    bn_weight: float = 0.05
    first_bn_weight: float = 10.0
    tv_l2_weight: float = 1e-4
    tv_l1_weight: float = 0.0
    l2_weight: float = 1e-5
    jitter: float = 30 / 224
    flip: bool = True
    track_clean: bool = True
    objective: object = None

    def __post_init__(self):
        _check(self)

    def __call__(self, prior, encoder: nn.Module, target: torch.Tensor, generators: Sequence[torch.Generator],
                 *, cond=None, callback=None, progress: bool = False) -> SampleOutput:
        model = getattr(encoder, "model", encoder)
        label = getattr(encoder, "name", "") or type(model).__name__
        bns = _batchnorms(model)
        if not bns:
            raise NotApplicableError(f"deepinversion needs BatchNorm layers; {label} has none "
                                     f"(no nn.BatchNorm2d with running statistics in {type(model).__name__})")
        dev, target, (C, H, W) = _prepare(self.name, prior, target, generators, cond)
        param = (0.5 + self.init_std * randn(generators, (C, H, W), device=dev)).clamp(0, 1).requires_grad_(True)
        data = resolve_objective(self.objective, default=FeatureMatch(relative=True))
        lim = int(round(self.jitter * W)), int(round(self.jitter * H))
        order = {id(m): k for k, m in enumerate(bns)}
        warm = int(round(self.warmup * self.steps))

        def lr_at(i):  # DeepInversion's lr_cosine_policy
            if not self.cosine_lr:
                return self.lr
            if i < warm:
                return self.lr * (i + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, self.steps - warm))) * self.lr

        def view(img):
            u = _uniform(generators, 3, dev).cpu()
            ox = (u[:, 0] * (2 * lim[0] + 1)).floor().long().clamp(max=2 * lim[0]) - lim[0]
            oy = (u[:, 1] * (2 * lim[1] + 1)).floor().long().clamp(max=2 * lim[1]) - lim[1]
            x = torch.stack([torch.roll(img[b], shifts=(int(oy[b]), int(ox[b])), dims=(1, 2))
                             for b in range(img.shape[0])])
            if self.flip:
                f = (u[:, 2] > 0.5).to(dev)
                x = torch.where(per_sample(f, x), x.flip(-1), x)
            return x

        def step_loss(img, _i):
            x = view(img) if (self.flip or any(lim)) else img
            stats: list[tuple[int, torch.Tensor]] = []

            def hook(mod, inputs):
                a = inputs[0].float()
                mean, var = a.mean(dim=(2, 3)), a.var(dim=(2, 3), unbiased=False)
                r = (mean - mod.running_mean.float()).norm(dim=1) + (var - mod.running_var.float()).norm(dim=1)
                stats.append((order[id(mod)], r))

            handles = [m.register_forward_pre_hook(hook) for m in bns]
            try:
                feat = encoder(x)
            finally:
                for h in handles:
                    h.remove()
            if not stats:
                raise NotApplicableError(f"deepinversion needs BatchNorm layers; none of {label}'s "
                                         f"{len(bns)} BatchNorm layers runs before layer "
                                         f"{getattr(encoder, 'layer', None)!r}")
            first = min(k for k, _ in stats)
            r_feature = sum((self.first_bn_weight if k == first else 1.0) * r for k, r in stats)
            loss = self.main_weight * data(feat, target) + self.bn_weight * r_feature
            if self.tv_l2_weight or self.tv_l1_weight or self.l2_weight:
                xin = _encoder_input(encoder, x)
                tv2, tv1 = _tv_deepinversion(xin)
                loss = loss + self.tv_l2_weight * tv2 + self.tv_l1_weight * tv1
                loss = loss + self.l2_weight * xin.flatten(1).norm(dim=1)
            return loss, feat

        def project(p):
            p.clamp_(0, 1)

        return _optimise(self.name, self.steps, self.objective, encoder, target, param, lambda p: p, step_loss,
                         lr=self.lr, betas=self.betas, lr_at=lr_at, project=project,
                         track_clean=self.track_clean, transformed=self.flip or any(lim),
                         callback=callback, progress=progress)
