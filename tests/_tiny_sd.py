"""A tiny random Stable-Diffusion-layout folder with the shapes world's structure (32x32 images, 8x8x4
latents, cross-attention down to 2x2 as LEDITS++ needs) and its caption tokenizer, for fast tests."""
from pathlib import Path

import torch


def build_tiny_sd(root: Path, latent_size: int = 8) -> Path:
    """``latent_size`` 8 (the committed folders' layout) or 16 (a VAE with one down-sampling less)."""
    from diffusers import AutoencoderKL

    from featinv.zoo.shapes import sd as S
    from featinv.zoo.shapes import text as T

    if latent_size not in (8, 16):
        raise ValueError(f"latent_size must be 8 or 16, got {latent_size}")
    torch.manual_seed(0)
    tok = T.build_tokenizer()
    unet = S.build_unet(block_out_channels=(16, 16, 16), norm_num_groups=8, attention_head_dim=8,
                        cross_attention_dim=16, sample_size=latent_size)
    blocks = 3 if latent_size == 8 else 2  # AutoencoderKL halves the size in every block but the last
    vae = AutoencoderKL(**{**S.VAE_CONFIG, "block_out_channels": (8, 16, 16)[:blocks], "norm_num_groups": 4,
                           "down_block_types": ("DownEncoderBlock2D",) * blocks,
                           "up_block_types": ("UpDecoderBlock2D",) * blocks})
    text = S.build_text_encoder(len(tok), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                num_hidden_layers=1, projection_dim=16)
    for sub, obj in dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=S.build_scheduler()).items():
        obj.save_pretrained(root / sub)
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0", '
                                           '"feature_extractor": [null, null], "safety_checker": [null, null], '
                                           '"requires_safety_checker": false, '
                                           '"scheduler": ["diffusers", "DDPMScheduler"], '
                                           '"text_encoder": ["transformers", "CLIPTextModel"], '
                                           '"tokenizer": ["transformers", "CLIPTokenizer"], '
                                           '"unet": ["diffusers", "UNet2DConditionModel"], '
                                           '"vae": ["diffusers", "AutoencoderKL"]}')
    return root
