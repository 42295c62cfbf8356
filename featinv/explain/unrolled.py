"""A few-step DDIM sampler unrolled with gradients to the conditioning (DiffExplainer / DEXTER).

DiffExplainer (Pennisi et al., arXiv 2404.02618) and DEXTER (Carnemolla et al., arXiv 2510.14741)
optimise the *text conditioning* of a diffusion model so that the images it generates maximise a
classifier's output. Their visual pipeline samples from a *fixed* initial noise in a few steps (DEXTER:
4 LCM steps, CFG 1.0) and backpropagates through every UNet call and the VAE decode to the prompt.
featinv's prior is a DDPM-trained ``featinv.priors.Prior``; the few-step sampler here is deterministic
DDIM (Song et al. 2021, Eq. 12, eta = 0) on ``prior.sampling_timesteps(steps)``:

    z_T = noise (fixed);   for t_i:  eps = eps_theta(z, t_i | cond)  [CFG: e_u + s (e_c - e_u)]
                                     z  = DDIM(z, eps, a_{t_i} -> a_{t_{i+1}})   (a after the last step = 1)
    image = prior.decode(z_0)

Every operation is differentiable in ``cond`` (B, L, D) — and in ``noise``. ``checkpoint=True``
recomputes each UNet call in the backward pass (``torch.utils.checkpoint``) instead of storing its
activations: memory O(1) in the number of steps for one extra forward per step.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from featinv.guidance import ddim_step

__all__ = ["unrolled_sample", "cfg_eps", "alphas_for"]


@contextmanager
def _plain_eps(prior):
    """Run ``prior.eps`` without the prior's own classifier-free guidance (the sampler does it)."""
    old = prior.cfg_scale
    prior.cfg_scale = 1.0
    try:
        yield
    finally:
        prior.cfg_scale = old


def cfg_eps(prior, z: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor | None,
            cfg_scale: float) -> torch.Tensor:
    """eps_theta(z, t | cond), with classifier-free guidance (Ho & Salimans 2022) when ``cfg_scale != 1``:
    e_u + s (e_c - e_u), e_u conditioned on ``uncond`` (the negative / empty prompt)."""
    with _plain_eps(prior):
        if cfg_scale == 1.0:
            return prior.eps(z, t, cond)
        if uncond is None:
            raise ValueError("cfg_scale != 1 needs the unconditional embedding `uncond`")
        B = z.shape[0]
        both = torch.cat([uncond.to(cond.dtype).expand(B, -1, -1), cond])
        e_u, e_c = prior.eps(torch.cat([z, z]), t, both).chunk(2)
        return e_u + cfg_scale * (e_c - e_u)


def alphas_for(prior, steps: int) -> tuple[list[int], list[float]]:
    """The sampling timesteps and alphas_cumprod along them, with 1.0 appended (x0 after the last step)."""
    ts = prior.sampling_timesteps(steps)
    acp = prior.alphas_cumprod
    return ts, [float(acp[t]) for t in ts] + [1.0]


def unrolled_sample(prior, cond: torch.Tensor, noise: torch.Tensor, steps: int = 8, *, cfg_scale: float = 1.0,
                    uncond: torch.Tensor | None = None, checkpoint: bool = False,
                    clamp: str = "straight_through", return_latent: bool = False):
    """Images (B, C, H, W) in [0, 1] from ``noise`` (B, *latent_shape) and ``cond`` (B or 1, L, D),
    differentiable in ``cond`` (see the module docstring).

    ``uncond``: the unconditional embedding for CFG (default: the prior's ``uncond`` buffer, else its
    empty-prompt ``cond``). ``clamp``: how the decoded image is clamped (``featinv.priors.to_unit``).
    ``return_latent``: also return z_0.
    """
    if noise.ndim != 4 or tuple(noise.shape[1:]) != tuple(prior.latent_shape):
        raise ValueError(f"noise must be (B, {', '.join(map(str, prior.latent_shape))}), got {tuple(noise.shape)}")
    B = noise.shape[0]
    cond = cond.expand(B, -1, -1) if cond.shape[0] == 1 else cond
    if cond.shape[0] != B:
        raise ValueError(f"cond has batch {cond.shape[0]}, noise has {B}")
    if cfg_scale != 1.0 and uncond is None:
        uncond = prior.uncond if getattr(prior, "uncond", None) is not None else prior.cond
    ts, alphas = alphas_for(prior, steps)
    x0_range = getattr(prior, "x0_range", None)

    def step(z, c, i):
        eps = cfg_eps(prior, z, ts[i], c, uncond, cfg_scale)
        return ddim_step(z, eps, alphas[i], alphas[i + 1], 0.0, x0_range=x0_range)

    z = noise
    for i in range(len(ts)):
        if checkpoint and torch.is_grad_enabled():
            z = _checkpoint(step, z, cond, i, use_reentrant=False)
        else:
            z = step(z, cond, i)
    img = prior.decode(z, clamp=clamp)
    return (img, z) if return_latent else img
