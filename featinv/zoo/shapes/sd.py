"""``zoo:shapes-sd``: a miniature Stable Diffusion with SD's exact structure and folder layout.

``AutoencoderKL`` 32x32x3 -> 8x8x4, ``UNet2DConditionModel`` with cross-attention at 8x8, 4x4 and 2x2
(diffusers' LEDITS++ aggregates attention at latent_res / 4 = 2x2), a tiny ``CLIPTextModel`` trained
jointly with the UNet, the shapes ``CLIPTokenizer`` (``text.py``) and a ``DDPMScheduler`` (``shapes-sd``: SD's
scaled-linear betas rescaled to zero terminal SNR, v prediction, trailing steps -- Lin et al. 2024, as SD 2.x
fine-tunes do; ``shapes-multi-sd``: SD 1.x's epsilon schedule, ``SCHEDULER_CONFIG``); saved with
``StableDiffusionPipeline.save_pretrained`` (no safety checker / feature extractor), so the folder loads
unchanged in diffusers and through ``featinv.priors.LatentPrior.from_pretrained``.

Two such folders: ``shapes-multi-sd`` (DEPICT's multi-object scenes) with the ``shapes-vae`` stage's VAE, and
``shapes-sd`` (single-object scenes; its empty prompt is the unconditional prior inversion uses) with the same VAE
whose decoder ``shapes-vae-dec`` fine-tuned (same encoder, so the same latents; two files, never a link). A third
folder, ``shapes-pixel``, is the issue's pixel-space fallback: no VAE, a UNet on 32x32 pixels (``PIXEL_UNET_CONFIG``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
SD_NAMES = ("shapes-sd", "shapes-multi-sd")
# the fallback prior: the same text encoder and tokenizer, a UNet2DConditionModel on 32x32 pixels (no VAE),
# loaded by ``featinv.priors.PixelPrior`` (``zoo:shapes-pixel``)
PIXEL_NAME = "shapes-pixel"
PRIOR_NAMES = (*SD_NAMES, PIXEL_NAME)
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
                  latent_channels=4, norm_num_groups=16, sample_size=32)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=20, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64)
UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 64, 64),
                   down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                   cross_attention_dim=64, attention_head_dim=32, norm_num_groups=32)
# 32 -> 16 -> 8 with cross-attention at 8x8 (and the 8x8 mid block): 1.25 M params, ~1.1 s per batch of 128 on
# 2 CPU cores, as fast as the latent UNet's 2.4 M at 8x8 (cross-attention at 32x32 and 16x16 costs 4x)
PIXEL_UNET_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                         block_out_channels=(32, 48, 64),
                         down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                         attention_head_dim=32, norm_num_groups=16)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type="epsilon", clip_sample=False, steps_offset=1)


def sd_dir(name: str = "shapes-sd", root: str | Path | None = None) -> Path:
    if name not in PRIOR_NAMES:
        raise KeyError(f"unknown shapes prior {name!r}; known: {PRIOR_NAMES}")
    return Path(root or WEIGHTS_DIR) / name


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_text_encoder(vocab_size: int, **over):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **{**TEXT_CONFIG, **over}))


def build_unet(**over):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**UNET_CONFIG, **over})


def build_scheduler(**over):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{**SCHEDULER_CONFIG, **over})


def half_copy(model):
    """A float16 copy for storage: diffusers loads it back as float32 unless ``torch_dtype`` is given."""
    import copy

    return copy.deepcopy(model).to(torch.float16)


def save_sd(folder: Path, *, unet, vae, text_encoder, tokenizer, scheduler) -> Path:
    """Write an SD-layout folder with ``StableDiffusionPipeline.save_pretrained`` (safetensors; UNet and
    VAE weights stored as float16 to keep the repository small, the text encoder as float32)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=half_copy(vae), text_encoder=text_encoder, tokenizer=tokenizer, unet=half_copy(unet),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def save_pixel(folder: Path, *, unet, text_encoder, tokenizer, scheduler) -> Path:
    """Write the pixel prior's folder: ``unet/`` (float16), ``text_encoder/``, ``tokenizer/``, ``scheduler/``."""
    folder = Path(folder)
    half_copy(unet).save_pretrained(str(folder / "unet"), safe_serialization=True)
    text_encoder.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    scheduler.save_pretrained(str(folder / "scheduler"))
    return folder


@dataclass
class PixelPipeline:
    """The pixel prior's parts under a ``StableDiffusionPipeline``'s names (``vae`` None), for ``generate``."""
    unet: object
    text_encoder: object
    tokenizer: object
    scheduler: object
    vae: None = None


def load_pipeline(name_or_dir: str | Path = "shapes-sd", scheduler: str | None = None):
    """``StableDiffusionPipeline`` of a shapes SD folder (CPU, fp32, progress bar off); a ``PixelPipeline`` of the
    pixel prior's folder (no ``vae/``)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(name_or_dir) if Path(str(name_or_dir)).is_dir() else sd_dir(str(name_or_dir))
    if not (folder / "vae").is_dir():
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        return PixelPipeline(UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True).float(),
                             CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True),
                             CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
                             DDPMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    if scheduler == "ddim":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    """(B, L, D) text hidden states, as SD conditions on (padded to the tokenizer's max length)."""
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def ddim_scheduler(config, clip_sample: bool = False):
    """diffusers' ``DDIMScheduler`` whose steps stay finite at zero terminal SNR for any eta <= 1; ``clip_sample``
    clips x0-hat to [-1, 1] in each step (pixel space, as ``featinv.priors.PixelPrior``'s sampler does).

    DDIM's sigma_t^2 = eta^2 (1 - a_prev)/(1 - a_t) (1 - a_t / a_prev) equals 1 - a_prev when a_t = 0 (the first
    step of a zero-terminal-SNR schedule) and eta = 1; the library then takes (1 - a_prev - sigma_t^2)^0.5 after a
    square root and a square, and float rounding makes it the root of a negative number: NaN latents, black
    images (eta 0.5 or 0.9 stay finite). The variance is clamped just below 1 - a_prev, its exact bound, which
    keeps every eta <= 1 finite."""
    from diffusers import DDIMScheduler

    class _DDIM(DDIMScheduler):
        def _get_variance(self, timestep, prev_timestep):
            a_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
            return torch.minimum(super()._get_variance(timestep, prev_timestep), (1 - a_prev) * (1 - 1e-5))

    return _DDIM.from_config(config, clip_sample=clip_sample, clip_sample_range=1.0, set_alpha_to_one=False)


@torch.no_grad()
def generate(pipe, captions: list[str], *, seeds, cfg_scale: float = 3.0, steps: int = 25, batch: int = 64,
             eta: float = 0.0, negative: str = "", guidance_rescale: float = 0.0, scheduler=None) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1] from captions with DDIM + classifier-free guidance; one
    generator per image (``seeds``), so an image never depends on its batch companions' captions.
    ``pipe`` without a VAE (``PixelPipeline``) samples pixels, x0-hat clipped to [-1, 1] in each step.

    ``scheduler``: another deterministic diffusers scheduler built from ``pipe.scheduler.config`` (e.g.
    ``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``) instead of DDIM; ``eta > 0`` needs DDIM.
    ``guidance_rescale``: Lin et al. 2024 ("Common diffusion noise schedules and sample steps are flawed",
    Sec. 3.4) through diffusers' ``rescale_noise_cfg``: the guided output's std is pulled back to the
    conditional one's, by this fraction."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale={guidance_rescale} is outside [0, 1]")
    if scheduler is not None and eta > 0:
        raise ValueError(f"eta={eta} needs the DDIM sampler; leave scheduler=None for stochastic DDIM")
    unet, vae = pipe.unet, pipe.vae
    sched = ddim_scheduler(pipe.scheduler.config, clip_sample=vae is None) if scheduler is None else scheduler
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    out = []
    for i in range(0, len(captions), batch):
        sched.set_timesteps(steps)  # multistep schedulers keep state between calls: reset per batch
        caps, sds = list(captions[i:i + batch]), list(seeds[i:i + batch])
        cond = encode_captions(pipe.text_encoder, pipe.tokenizer, caps)
        unc = encode_captions(pipe.text_encoder, pipe.tokenizer, [negative]).expand(len(caps), -1, -1)
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in sds])
        z = z * sched.init_noise_sigma
        gens = [torch.Generator().manual_seed(int(s) + 1) for s in sds]
        for t in sched.timesteps:
            tt = t.expand(len(z))
            zin = sched.scale_model_input(z, t)
            if cfg_scale == 1.0:
                eps = unet(zin, tt, encoder_hidden_states=cond).sample
            else:
                e_u, e_c = unet(torch.cat([zin, zin]), torch.cat([tt, tt]),
                                encoder_hidden_states=torch.cat([unc, cond])).sample.chunk(2)
                eps = e_u + cfg_scale * (e_c - e_u)
                if guidance_rescale > 0:
                    eps = rescale_noise_cfg(eps, e_c, guidance_rescale=guidance_rescale)
            if eta > 0:
                noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
                z = sched.step(eps, t, z, eta=eta, variance_noise=noise).prev_sample
            elif scheduler is None:
                z = sched.step(eps, t, z, eta=0.0).prev_sample
            else:
                z = sched.step(eps, t, z).prev_sample
        if not torch.isfinite(z).all():
            raise FloatingPointError(f"generate: non-finite samples (eta={eta}, steps={steps}, cfg={cfg_scale})")
        img = z if vae is None else vae.decode(z / vae.config.scaling_factor).sample
        out.append((img / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def read_model_index(folder: Path) -> dict:
    return json.loads((Path(folder) / "model_index.json").read_text())
