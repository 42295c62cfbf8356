"""Diffusion priors: one protocol, a pixel and a latent implementation.

A prior gives what a guided sampler needs from a pretrained diffusion model (DESIGN.md):
the predicted noise eps(z_t, t), the training schedule's alphas_cumprod, the shape of z, and
``decode(x0) -> image in [0, 1]`` (an affine map for pixel priors, the VAE for latent priors).
The sampler never touches the UNet directly, so any diffusers model fits behind this interface.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["Prior", "PixelPrior", "LatentPrior", "build_prior", "register_prior", "PRIORS"]


class Prior(nn.Module):
    """Protocol of every prior. Subclasses set ``unet``, ``alphas_cumprod`` and ``latent_shape``."""

    alphas_cumprod: torch.Tensor  # (T,), training schedule, on the prior's device
    latent_shape: tuple[int, int, int]  # (C, H, W) of z_t
    x0_range: float | None = None  # |x0| bound the sampler clips x0-hat to in its update (None: no clip)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def eps(self, z: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Predicted noise eps_theta(z_t, t) (Ho et al. 2020, Eq. 11)."""
        raise NotImplementedError

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Clean estimate in model space -> image in [0, 1], differentiably."""
        raise NotImplementedError


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped with a straight-through gradient.

    A hard clamp has zero gradient on saturated pixels, and early in sampling x0-hat is mostly
    saturated: guidance would vanish exactly where it matters. Forward values equal a clamp.
    """
    y = x / 2 + 0.5
    return y + (y.clamp(0, 1) - y).detach()


def _alphas_cumprod(scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.detach().clone().float()


def _eps_from_output(out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, acp: torch.Tensor, kind: str):
    """Convert a UNet output to eps for the three diffusers prediction types."""
    if kind == "epsilon":
        return out
    a = acp[t].view(-1, 1, 1, 1).to(z.dtype)
    if kind == "v_prediction":  # Salimans & Ho 2022: eps = sqrt(a) v + sqrt(1-a) z
        return a.sqrt() * out + (1 - a).sqrt() * z
    if kind == "sample":  # eps = (z - sqrt(a) x0) / sqrt(1-a)
        return (z - a.sqrt() * out) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction_type {kind!r}")


class PixelPrior(Prior):
    """A pixel-space DDPM (diffusers ``UNet2DModel``); images live in [-1, 1] (Ho et al. 2020).

    The sampler clips x0-hat to [-1, 1] in its update (as DDPM does): with a cosine schedule
    a_T ~ 1e-7, and an unclipped first step amplifies the noise-prediction error by sqrt(a_prev/a_T).
    """

    x0_range = 1.0

    def __init__(self, unet, scheduler, prediction_type: str | None = None):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler.config)
        self.prediction_type = prediction_type or scheduler.config.get("prediction_type", "epsilon")
        self.register_buffer("alphas_cumprod", _alphas_cumprod(scheduler), persistent=False)
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (unet.config.in_channels, *size)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, local_files_only: bool | None = None, **kw) -> "PixelPrior":
        """Load a diffusers pipeline folder or hub id holding ``unet/`` and ``scheduler/``."""
        from diffusers import DDPMScheduler, UNet2DModel

        from featinv.hub import hub_call

        unet = hub_call(UNet2DModel.from_pretrained, path, subfolder="unet", local_files_only=local_files_only, **kw)
        sched = hub_call(DDPMScheduler.from_pretrained, path, subfolder="scheduler", local_files_only=local_files_only)
        return cls(unet, sched)

    def eps(self, z, t):
        t = _as_timesteps(t, z)
        out = self.unet(z.to(self.dtype), t).sample
        return _eps_from_output(out, z, t, self.alphas_cumprod, self.prediction_type).to(z.dtype)

    def decode(self, x0):
        return to_unit(x0)


class LatentPrior(Prior):
    """Latent diffusion (Rombach et al. 2022): ``UNet2DConditionModel`` + ``AutoencoderKL`` with a
    fixed conditioning embedding (the empty prompt by default, as in Shirahama et al. 2025).

    ``cfg_scale > 1`` enables classifier-free guidance (Ho & Salimans 2022) towards ``prompt``.
    """

    def __init__(self, unet, vae, scheduler, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                 cfg_scale: float = 1.0, image_size: int | None = None):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler.config)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        self.register_buffer("alphas_cumprod", _alphas_cumprod(scheduler), persistent=False)
        self.register_buffer("cond", cond.detach(), persistent=False)
        self.register_buffer("uncond", (uncond if uncond is not None else cond).detach(), persistent=False)
        self.cfg_scale = float(cfg_scale)
        self.vae_scale = float(vae.config.get("scaling_factor", 0.18215))
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        size = image_size or unet.config.sample_size * down
        self.latent_shape = (unet.config.in_channels, size // down, size // down)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, prompt: str = "", negative_prompt: str = "",
                        cfg_scale: float = 1.0, torch_dtype: torch.dtype | None = None,
                        local_files_only: bool | None = None, image_size: int | None = None,
                        gradient_checkpointing: bool = False) -> "LatentPrior":
        """Load a Stable Diffusion folder or hub id (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from featinv.hub import hub_call

        kw = dict(local_files_only=local_files_only)
        dt = dict(torch_dtype=torch_dtype) if torch_dtype is not None else {}
        unet = hub_call(UNet2DConditionModel.from_pretrained, path, subfolder="unet", **kw, **dt)
        vae = hub_call(AutoencoderKL.from_pretrained, path, subfolder="vae", **kw, **dt)
        sched = hub_call(DDPMScheduler.from_pretrained, path, subfolder="scheduler", **kw)
        tok = hub_call(CLIPTokenizer.from_pretrained, path, subfolder="tokenizer", **kw)
        text = hub_call(CLIPTextModel.from_pretrained, path, subfolder="text_encoder", **kw)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()
        cond = encode_prompt(text, tok, prompt).to(unet.dtype)
        uncond = encode_prompt(text, tok, negative_prompt).to(unet.dtype) if cfg_scale != 1.0 else None
        return cls(unet, vae, sched, cond, uncond, cfg_scale=cfg_scale, image_size=image_size)

    def eps(self, z, t):
        t = _as_timesteps(t, z)
        zz, cond = z.to(self.dtype), self.cond.expand(z.shape[0], -1, -1)
        if self.cfg_scale == 1.0:
            out = self.unet(zz, t, encoder_hidden_states=cond).sample
        else:
            un = self.uncond.expand(z.shape[0], -1, -1)
            o_u, o_c = self.unet(torch.cat([zz, zz]), torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([un, cond])).sample.chunk(2)
            out = o_u + self.cfg_scale * (o_c - o_u)
        return _eps_from_output(out, z, t, self.alphas_cumprod, self.prediction_type).to(z.dtype)

    def decode(self, x0):
        img = self.vae.decode(x0.to(self.dtype) / self.vae_scale).sample.float()
        return to_unit(img)


@torch.no_grad()
def encode_prompt(text_encoder, tokenizer, prompt: str) -> torch.Tensor:
    """CLIP text hidden states of one prompt, shape (1, L, D), as Stable Diffusion conditions on."""
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def _as_timesteps(t, z: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=z.device, dtype=torch.long)
    return t.expand(z.shape[0]) if t.ndim == 0 else t


# -- string specs --------------------------------------------------------------------------------
from featinv.registry import Registry, load_builtin_families  # noqa: E402

PRIORS = Registry("prior", load_builtin_families)
register_prior = PRIORS.register


@register_prior("pixel")
def _pixel(name: str, _layer=None, **kw) -> PixelPrior:
    """``pixel:<hub id or folder>``, e.g. ``pixel:google/ddpm-cifar10-32``."""
    return PixelPrior.from_pretrained(name, **kw)


@register_prior("latent")
def _latent(name: str, _layer=None, **kw) -> LatentPrior:
    """``latent:<hub id or folder>``, e.g. ``latent:CompVis/stable-diffusion-v1-4``."""
    return LatentPrior.from_pretrained(name, **kw)


def build_prior(spec: "str | Prior", **kw) -> Prior:
    """Build a prior from ``zoo:digits-ddpm``, ``pixel:<id|dir>`` or ``latent:<id|dir>``."""
    if isinstance(spec, nn.Module):
        return spec
    return PRIORS.build(spec, **kw)
