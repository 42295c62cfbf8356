"""DEPICT's pixel-attribution baseline: Grad-CAM (Selvaraju et al., ICCV 2017) from Captum, pooled
over concept masks into a concept ranking (Jabbour et al. 2024 compare DEPICT with Grad-CAM masks
against object masks in the same way).

Per image: the Grad-CAM map of the class the classifier predicts (``captum.attr.LayerGradCam`` at a
convolutional layer, ReLU as in the paper), up-sampled to the image (``LayerAttribution.interpolate``,
bilinear); concept k's share of the image's evidence = sum(cam * mask_k) / sum(cam). A concept's
importance is its mean share over the dataset (0 on images without it). Captum does the attribution;
only the pooling is written here. Plain PyTorch (Captum is an optional dependency: ``pip install
featinv[explain]``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["gradcam_maps", "gradcam_concept_importance"]


def _layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(model.named_modules())
    if layer not in modules:
        raise KeyError(f"layer {layer!r} not in the model; it has {[n for n in modules if n][:20]} ...")
    return modules[layer]


def gradcam_maps(model: nn.Module, layer: str | nn.Module, images: torch.Tensor, target: str | int = "pred",
                 batch: int = 128) -> torch.Tensor:
    """(N, H, W) non-negative Grad-CAM maps at image resolution for the predicted class (``"pred"``) or
    a fixed class index."""
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the Grad-CAM baseline needs Captum: pip install 'featinv[explain]'") from e
    cam = LayerGradCam(model, _layer(model, layer))
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].float().clone().requires_grad_(True)
        with torch.no_grad():
            pred = model(x).argmax(1)
        tgt = pred if target == "pred" else int(target)
        with torch.enable_grad():
            a = cam.attribute(x, target=tgt, relu_attributions=True)
        a = LayerAttribution.interpolate(a.detach(), tuple(images.shape[-2:]), interpolate_mode="bilinear")
        out.append(a[:, 0].clamp_min(0).cpu())
    return torch.cat(out)


def gradcam_concept_importance(model: nn.Module, layer: str | nn.Module, images: torch.Tensor,
                               concept_masks: torch.Tensor, target: str | int = "pred",
                               batch: int = 128) -> np.ndarray:
    """(C,) mean share of Grad-CAM evidence that falls on each concept's mask (``concept_masks``
    (N, C, H, W) coverage in [0, 1], zero where a concept is absent)."""
    if concept_masks.shape[0] != images.shape[0] or concept_masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"concept masks {tuple(concept_masks.shape)} do not match images {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    try:
        maps = gradcam_maps(model, layer, images, target, batch)
    finally:
        model.train(was_training)
    total = maps.flatten(1).sum(1)
    mass = torch.einsum("nhw,nchw->nc", maps, concept_masks.float())
    share = torch.where(total[:, None] > 0, mass / total.clamp_min(1e-12)[:, None], torch.zeros_like(mass))
    return share.mean(0).double().numpy()
