"""Diffusion priors: one protocol, a pixel and a latent implementation.

A prior gives a sampler what it needs from a pretrained diffusion model:

* ``eps(z, t, cond=None)``: the predicted noise eps_theta(z_t, t) (Ho et al. 2020, Eq. 11), for
  epsilon-, v- and sample-prediction models alike; ``cond`` is per-sample conditioning (prompt
  embeddings (B, L, D) from ``encode_prompt``), None for the prior's default (its fixed prompt,
  the empty prompt unless given); with ``cfg_scale != 1`` classifier-free guidance (Ho & Salimans
  2022) mixes it with the negative prompt's prediction. Gradients flow to ``z`` and ``cond``.
* ``alphas_cumprod`` (T,) of the training schedule, ``latent_shape`` (C, H, W) of z_t;
* ``decode(x0, clamp=...)``: clean estimate in model space -> image in [0, 1], differentiably;
* ``sampling_timesteps(steps)``: the timesteps a sampler walks (override it to change the
  spacing); ``x0_range``: the |x0| bound the sampler clips x0-hat to in its update.

``PixelPrior`` wraps a diffusers ``UNet2DModel`` (or a text-conditioned ``UNet2DConditionModel``
with its text encoder); ``LatentPrior`` a ``UNet2DConditionModel`` + ``AutoencoderKL`` (Rombach et
al. 2022), as Stable Diffusion. The sampler never touches the UNet directly.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from featinv.specs import register_prior

__all__ = ["Prior", "PixelPrior", "LatentPrior", "to_unit", "CLAMPS"]

CLAMPS = ("straight_through", "hard")


def to_unit(x: torch.Tensor, clamp: str = "straight_through") -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped.

    ``hard``: a plain clamp, zero gradient on saturated pixels (what the reference implementation
    of Shirahama et al. 2025 does). ``straight_through``: the same forward values, identity
    gradient: early in sampling x0-hat is mostly saturated and a hard clamp leaves little to guide.
    """
    y = x / 2 + 0.5
    if clamp == "hard":
        return y.clamp(0, 1)
    if clamp == "straight_through":
        return y + (y.clamp(0, 1) - y).detach()
    raise ValueError(f"decode clamp must be one of {CLAMPS}, got {clamp!r}")


class Prior(nn.Module):
    """Protocol of every prior (see the module docstring). Subclasses set ``unet``,
    ``scheduler_config``, ``alphas_cumprod``, ``latent_shape`` and implement ``decode``; a
    text-conditioned prior also has ``text_encoder``, ``tokenizer`` and the ``cond``/``uncond``
    buffers (its default prompt and negative prompt embeddings)."""

    unet: nn.Module
    scheduler_config: dict
    alphas_cumprod: torch.Tensor
    latent_shape: tuple[int, int, int]
    prediction_type: str = "epsilon"
    x0_range: float | None = None
    # annotation only: a class-level default would shadow the submodule nn.Module registers in _modules
    # (prior.text_encoder would read None); _init_text always sets it
    text_encoder: nn.Module | None
    tokenizer = None
    cfg_scale: float = 1.0

    def _init_schedule(self, scheduler) -> None:
        self.scheduler_config = dict(scheduler.config)
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        acp = scheduler.alphas_cumprod.detach().clone().float()
        # a zero-terminal-SNR schedule (Lin et al. 2024; diffusers' rescale_betas_zero_snr) ends at a = 0, where
        # Tweedie's x0 = (z - sqrt(1-a) eps) / sqrt(a) is 0/0: use diffusers' 2^-24 there (x0 -> -v for v models)
        acp[acp == 0] = 2.0 ** -24
        self.register_buffer("alphas_cumprod", acp, persistent=False)

    def _init_text(self, text_encoder, tokenizer, cond, uncond, cfg_scale: float) -> None:
        """Default conditioning: ``cond`` (1, L, D) and ``uncond`` embeddings, or encoded "" prompts."""
        self.text_encoder = text_encoder.eval().requires_grad_(False) if text_encoder is not None else None
        self.tokenizer = tokenizer
        if self.conditional and cond is None:
            cond = self.encode_prompt([""])
        self.register_buffer("cond", cond.detach() if cond is not None else None, persistent=False)
        self.register_buffer("uncond", (uncond if uncond is not None else cond).detach()
                             if cond is not None else None, persistent=False)
        self.cfg_scale = float(cfg_scale)

    @property
    def conditional(self) -> bool:
        return getattr(getattr(self.unet, "config", None), "cross_attention_dim", None) is not None

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def sampling_timesteps(self, steps: int) -> list[int]:
        """The ``steps`` timesteps a sampler visits, from T - 1 down ("trailing" spacing, Lin et al.
        2024, Table 2: the first step starts from pure noise). Override to change the spacing.
        (diffusers' trailing ``set_timesteps`` emits a stray t = -1 for step counts that do not
        divide T, e.g. 61 of 1000, so the integers are computed here exactly.)"""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps={steps} is invalid for a prior with {T} training timesteps; use 1..{T}")
        return [round(T * (steps - i) / steps) - 1 for i in range(steps)]

    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states (B, L, D) of the prompts, as Stable Diffusion conditions on.
        (For gradients to the text, call ``self.text_encoder`` on input embeddings yourself.)"""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no text encoder: it cannot take prompts")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0].to(self.dtype)

    def unet_output(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if not self.conditional:
            if cond is not None:
                raise ValueError(f"{type(self).__name__}: this UNet is unconditional; it takes no `cond`")
            return self.unet(z, t).sample
        cond = (self.cond if cond is None else cond.to(self.dtype)).expand(z.shape[0], -1, -1)
        if self.cfg_scale == 1.0:
            return self.unet(z, t, encoder_hidden_states=cond).sample
        un = self.uncond.expand(z.shape[0], -1, -1)
        o_u, o_c = self.unet(torch.cat([z, z]), torch.cat([t, t]), encoder_hidden_states=torch.cat([un, cond])
                             ).sample.chunk(2)
        return o_u + self.cfg_scale * (o_c - o_u)

    def eps(self, z: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise eps_theta(z_t, t | cond) for any prediction type."""
        t = torch.as_tensor(t, device=z.device, dtype=torch.long)
        t = t.expand(z.shape[0]) if t.ndim == 0 else t
        out = self.unet_output(z.to(self.dtype), t, cond)
        return _eps_from_output(out, z, t, self.alphas_cumprod, self.prediction_type).to(z.dtype)

    def decode(self, x0: torch.Tensor, clamp: str = "straight_through") -> torch.Tensor:
        """Clean estimate in model space -> image in [0, 1], differentiably."""
        raise NotImplementedError


def _eps_from_output(out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, acp: torch.Tensor, kind: str):
    """Convert a UNet output to eps for the three diffusers prediction types."""
    if kind == "epsilon":
        return out
    a = acp.to(t.device)[t].view(-1, 1, 1, 1).to(z.dtype)
    if kind == "v_prediction":  # Salimans & Ho 2022: eps = sqrt(a) v + sqrt(1-a) z
        return a.sqrt() * out + (1 - a).sqrt() * z
    if kind == "sample":  # eps = (z - sqrt(a) x0) / sqrt(1-a)
        return (z - a.sqrt() * out) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction_type {kind!r}")


class PixelPrior(Prior):
    """A pixel-space diffusion model (Ho et al. 2020); images live in [-1, 1].

    The sampler clips x0-hat to [-1, 1] in its update (as DDPM does): with a cosine schedule
    a_T ~ 1e-7, and an unclipped first step amplifies the noise-prediction error by sqrt(a_prev/a_T).
    A ``UNet2DConditionModel`` with a text encoder makes it text-conditioned (``cond``, ``cfg_scale``).
    """

    x0_range = 1.0

    def __init__(self, unet, scheduler, prediction_type: str | None = None, *, text_encoder=None, tokenizer=None,
                 cond: torch.Tensor | None = None, uncond: torch.Tensor | None = None, cfg_scale: float = 1.0):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self._init_schedule(scheduler)
        if prediction_type is not None:
            self.prediction_type = prediction_type
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (unet.config.in_channels, *size)
        self._init_text(text_encoder, tokenizer, cond, uncond, cfg_scale)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, prompt: str = "", negative_prompt: str = "",
                        cfg_scale: float = 1.0, local_files_only: bool | None = None, **kw) -> "PixelPrior":
        """Load a diffusers folder or hub id holding ``unet/`` and ``scheduler/`` (and, for a
        text-conditioned UNet, ``text_encoder/`` and ``tokenizer/``)."""
        from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

        from featinv.hub import hub_call

        lf = dict(local_files_only=local_files_only)
        config = hub_call(UNet2DModel.load_config, path, subfolder="unet", **lf)
        cls_ = UNet2DConditionModel if config.get("_class_name") == "UNet2DConditionModel" else UNet2DModel
        unet = hub_call(cls_.from_pretrained, path, subfolder="unet", **lf, **kw)
        sched = hub_call(DDPMScheduler.from_pretrained, path, subfolder="scheduler", **lf)
        text = {}
        if getattr(unet.config, "cross_attention_dim", None) is not None:
            text = _load_text(path, lf, prompt, negative_prompt, cfg_scale)
        return cls(unet, sched, **text)

    def decode(self, x0, clamp: str = "straight_through"):
        return to_unit(x0, clamp)


class LatentPrior(Prior):
    """Latent diffusion (Rombach et al. 2022): ``UNet2DConditionModel`` + ``AutoencoderKL``,
    conditioned on the empty prompt by default, as in Shirahama et al. 2025."""

    def __init__(self, unet, vae, scheduler, cond: torch.Tensor | None = None, uncond: torch.Tensor | None = None,
                 cfg_scale: float = 1.0, image_size: int | None = None, *, text_encoder=None, tokenizer=None):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self._init_schedule(scheduler)
        self.vae_scale = float(vae.config.get("scaling_factor", 0.18215))
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        size = image_size or unet.config.sample_size * down
        self.latent_shape = (unet.config.in_channels, size // down, size // down)
        self._init_text(text_encoder, tokenizer, cond, uncond, cfg_scale)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, prompt: str = "", negative_prompt: str = "",
                        cfg_scale: float = 1.0, torch_dtype: torch.dtype | None = None,
                        local_files_only: bool | None = None, image_size: int | None = None,
                        gradient_checkpointing: bool = False) -> "LatentPrior":
        """Load a Stable Diffusion folder or hub id (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        from featinv.hub import hub_call

        lf = dict(local_files_only=local_files_only)
        dt = dict(torch_dtype=torch_dtype) if torch_dtype is not None else {}
        unet = hub_call(UNet2DConditionModel.from_pretrained, path, subfolder="unet", **lf, **dt)
        vae = hub_call(AutoencoderKL.from_pretrained, path, subfolder="vae", **lf, **dt)
        sched = hub_call(DDPMScheduler.from_pretrained, path, subfolder="scheduler", **lf)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()
        text = _load_text(path, lf, prompt, negative_prompt, cfg_scale, dtype=unet.dtype)
        return cls(unet, vae, sched, image_size=image_size, **text)

    def decode(self, x0, clamp: str = "straight_through"):
        img = self.vae.decode(x0.to(self.dtype) / self.vae_scale).sample.float()
        return to_unit(img, clamp)


def _load_text(path, lf: dict, prompt: str, negative_prompt: str, cfg_scale: float, dtype=None) -> dict:
    """Text encoder + tokenizer of an SD-layout folder, and the default prompt embeddings."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from featinv.hub import hub_call

    tok = hub_call(CLIPTokenizer.from_pretrained, path, subfolder="tokenizer", **lf)
    text = hub_call(CLIPTextModel.from_pretrained, path, subfolder="text_encoder", **lf)
    cond = encode_prompt(text, tok, prompt)
    uncond = encode_prompt(text, tok, negative_prompt) if cfg_scale != 1.0 else None
    if dtype is not None:
        cond, uncond = cond.to(dtype), (uncond.to(dtype) if uncond is not None else None)
    return dict(text_encoder=text, tokenizer=tok, cond=cond, uncond=uncond, cfg_scale=cfg_scale)


@torch.no_grad()
def encode_prompt(text_encoder, tokenizer, prompt: str | Sequence[str]) -> torch.Tensor:
    """CLIP text hidden states (B, L, D) of prompts, as Stable Diffusion conditions on."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


# -- string specs --------------------------------------------------------------------------------
@register_prior("pixel")
def pixel_prior(name: str, layer=None, *, prompt: str = "", negative_prompt: str = "", cfg_scale: float = 1.0,
                local_files_only: bool | None = None) -> PixelPrior:
    """``pixel:<hub id or folder>``, e.g. ``pixel:google/ddpm-cifar10-32``."""
    return PixelPrior.from_pretrained(name, prompt=prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale,
                                      local_files_only=local_files_only)


@register_prior("latent")
def latent_prior(name: str, layer=None, *, prompt: str = "", negative_prompt: str = "", cfg_scale: float = 1.0,
                 torch_dtype=None, local_files_only: bool | None = None, image_size: int | None = None,
                 gradient_checkpointing: bool = False) -> LatentPrior:
    """``latent:<hub id or folder>[?prompt=...&cfg_scale=...]``, e.g. ``latent:CompVis/stable-diffusion-v1-4``."""
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    return LatentPrior.from_pretrained(name, prompt=prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale,
                                       torch_dtype=torch_dtype, local_files_only=local_files_only,
                                       image_size=image_size, gradient_checkpointing=gradient_checkpointing)
