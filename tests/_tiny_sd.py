"""A tiny random Stable-Diffusion-layout folder with the shapes world's structure (32x32 images, 8x8x4
latents, cross-attention down to 2x2 as LEDITS++ needs) and its caption tokenizer, for fast tests."""
from pathlib import Path

import torch


def build_tiny_sd(root: Path) -> Path:
    from featinv.zoo.shapes import sd as S
    from featinv.zoo.shapes import text as T

    torch.manual_seed(0)
    tok = T.build_tokenizer()
    unet = S.build_unet(block_out_channels=(16, 16, 16), norm_num_groups=8, attention_head_dim=8,
                        cross_attention_dim=16)
    vae = S.build_vae()
    vae = type(vae)(**{**S.VAE_CONFIG, "block_out_channels": (8, 16, 16), "norm_num_groups": 4})
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
