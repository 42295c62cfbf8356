"""The embedded "digits world": small real models trained in this repository on scikit-learn's digits.

Three models, all on the same images, let every part of the feature-inversion pipeline run end to
end on a CPU, offline, in seconds:

* ``DigitsCNN``: a small convolutional classifier; its ``penultimate`` block gives a (B, 64) feature.
* ``build_digits_vit()``: a tiny timm ``VisionTransformer``; ``VIT_FEATURE_LAYER`` gives the (B, 64)
  CLS embedding after the final LayerNorm.
* a pixel-space DDPM prior (diffusers ``UNet2DModel`` + ``DDPMScheduler``) trained on the train split.

Images. scikit-learn's digits (Alpaydin & Kaynak, UCI) are 1,797 grey images of 8x8 pixels with values
0..16. We divide by 16 and upsample bilinearly to ``IMAGE_SIZE`` = 16: a UNet needs a side divisible by
4 to down-sample twice (16 -> 8 -> 4), and 16x16 costs 4x less than 32x32 on a CPU. Going further buys
nothing, because an 8x8 source holds no detail a 16x16 bilinear upsampling does not already show.

The split is fixed: a stratified 80/20 ``train_test_split(test_size=0.2, random_state=0, stratify=y)``,
1,437 train and 360 test images. Every model here saw only the train split; the test split is held out.

All models take images (B, 1, 16, 16) in [0, 1] directly (no normalisation by callers). The diffusion
prior works in [-1, 1] (x * 2 - 1), as ``featinv.priors.PixelPrior`` expects.

Weights live in ``WEIGHTS_DIR``; ``python -m featinv.zoo.train`` re-creates them (see ``meta.json``).
This module imports only torch, scikit-learn, safetensors, timm and diffusers (no lightning, no wandb).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "WEIGHTS_DIR", "IMAGE_SIZE", "SPLIT_RANDOM_STATE", "SPLIT_TEST_SIZE", "load_digits", "split_indices", "DigitsCNN",
    "build_digits_vit", "VIT_FEATURE_LAYER", "CNN_FEATURE_LAYER", "VIT_CONFIG", "DDPM_UNET_CONFIG",
    "DDPM_SCHEDULER_CONFIG", "build_digits_unet", "build_digits_scheduler", "load_digits_cnn",
    "load_digits_vit", "load_digits_ddpm",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
IMAGE_SIZE = 16
SPLIT_RANDOM_STATE = 0
SPLIT_TEST_SIZE = 0.2
VAL_SIZE = 256
SPLITS = ("train", "val", "test", "all")

CNN_FILE = "digits-cnn.safetensors"
VIT_FILE = "digits-vit.safetensors"
DDPM_DIR = "digits-ddpm"


# -- data ------------------------------------------------------------------------------------------
@functools.cache
def _sk_digits():
    from sklearn.datasets import load_digits as _sk_load_digits

    data = _sk_load_digits()
    x = torch.from_numpy(data.images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp_(0, 1)
    y = torch.from_numpy(data.target).long()
    return x, y


@functools.cache
def _split_indices_cached(split: str) -> torch.Tensor:
    from sklearn.model_selection import train_test_split

    y = _sk_digits()[1].numpy()
    idx = torch.arange(len(y)).numpy()
    if split == "all":
        return torch.from_numpy(idx).long()
    tr, te = train_test_split(idx, test_size=SPLIT_TEST_SIZE, random_state=SPLIT_RANDOM_STATE, stratify=y)
    if split == "val":  # a fixed, stratified subset of the train split, for choosing hyper-parameters
        _, va = train_test_split(tr, test_size=VAL_SIZE, random_state=SPLIT_RANDOM_STATE, stratify=y[tr])
        return torch.from_numpy(va).long()
    return torch.from_numpy(tr if split == "train" else te).long()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_indices(split: str = "test") -> torch.Tensor:
    """Indices of ``split`` into sklearn's 1,797 digits (the order ``load_digits(split)`` returns)."""
    _check_split(split)
    return _split_indices_cached(split).clone()


@functools.cache
def _load_digits_cached(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _sk_digits()
    sel = _split_indices_cached(split)
    return x[sel].contiguous(), y[sel].contiguous()


def load_digits(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images (N, 1, 16, 16) float32 in [0, 1] and labels (N,) int64.

    ``split``: ``"train"`` (1,437), ``"test"`` (360), ``"all"`` (1,797, sklearn's order) or ``"val"``
    (256, a fixed stratified subset of train: the models saw these digits, but benchmarks choose
    hyper-parameters on them and report on test). The split is the fixed stratified
    ``train_test_split(test_size=0.2, random_state=0, stratify=y)``.
    Results are cached; each call returns fresh clones.
    """
    _check_split(split)
    x, y = _load_digits_cached(split)
    return x.clone(), y.clone()


# -- classifiers -----------------------------------------------------------------------------------
CNN_FEATURE_LAYER = "penultimate"


class DigitsCNN(nn.Module):
    """Small CNN on (B, 1, 16, 16) images in [0, 1]; returns logits (B, 10).

    conv32-conv32-maxpool (8x8) - conv64-conv64-maxpool (4x4) - ``penultimate`` (flatten, linear 1024->64,
    ReLU: the default (B, 64) feature) - ``head`` (linear 64->10). BatchNorm after each conv.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(
            *block(1, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
        )
        self.penultimate = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * (IMAGE_SIZE // 4) ** 2, feature_dim),
                                         nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.penultimate(self.features(x)))


# timm VisionTransformer: 4x4 patches on 16x16 -> 16 tokens + CLS; class-token pooling.
VIT_CONFIG = dict(img_size=IMAGE_SIZE, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                  num_heads=4, mlp_ratio=4.0, global_pool="token")
# With class-token pooling timm applies the final ``norm`` in forward_features and ``fc_norm`` is an
# Identity applied to the pooled CLS token in forward_head: its output is the (B, 64) CLS embedding
# after the final LayerNorm (== forward_features(x)[:, 0]); tests/test_zoo.py checks this.
VIT_FEATURE_LAYER = "fc_norm"


def build_digits_vit() -> nn.Module:
    """An untrained tiny timm ViT for (B, 1, 16, 16) images in [0, 1] (trained on raw [0, 1] inputs)."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_CONFIG)


# -- diffusion prior -------------------------------------------------------------------------------
DDPM_UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),  # 16x16, 8x8 (attention), 4x4
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),  # 4x4, 8x8 (attention), 16x16
    attention_head_dim=32, norm_num_groups=16,
)
DDPM_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                             prediction_type="epsilon", clip_sample=False)


def build_digits_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**DDPM_UNET_CONFIG)


def build_digits_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**DDPM_SCHEDULER_CONFIG)


# -- loaders ---------------------------------------------------------------------------------------
def _weights_file(path, default: str) -> Path:
    p = Path(path) if path is not None else WEIGHTS_DIR / default
    if not p.exists():
        raise FileNotFoundError(f"digits weights not found at {p}; run `python -m featinv.zoo.train` to create them")
    return p


def load_digits_cnn(path: str | Path | None = None) -> DigitsCNN:
    """The trained ``DigitsCNN`` in eval mode (default weights: ``WEIGHTS_DIR / 'digits-cnn.safetensors'``)."""
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(str(_weights_file(path, CNN_FILE))))
    return model.eval()


def load_digits_vit(path: str | Path | None = None) -> nn.Module:
    """The trained digits ViT in eval mode (default weights: ``WEIGHTS_DIR / 'digits-vit.safetensors'``)."""
    from safetensors.torch import load_file

    model = build_digits_vit()
    model.load_state_dict(load_file(str(_weights_file(path, VIT_FILE))))
    return model.eval()


def load_digits_ddpm(path: str | Path | None = None):
    """``(UNet2DModel, DDPMScheduler)`` from a diffusers-pipeline-style folder (``unet/``, ``scheduler/``).

    Images live in [-1, 1]; the UNet predicts epsilon. Default folder: ``WEIGHTS_DIR / 'digits-ddpm'``.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    folder = _weights_file(path, DDPM_DIR)
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    return unet.eval(), sched
