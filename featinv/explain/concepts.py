"""Pixel-labelled concepts and Network Dissection of direction detectors (EDDP's labelling, Broden stand-in).

A world with a renderer knows, for every image, which pixels show the object and its factor values. A
*concept* is a (factor, value) pair whose mask is the object's pixels when the image's factor has that
value ("circle", "red", "large", "top left"), or the background's pixels for a background factor ("gray"
background); two generic concepts, ``any/object`` and ``any/background``, are every object / background
pixel. ``ConceptSet.masks`` builds the (N, C, H, W) boolean masks from object coverage maps and factor
labels (taken as arguments: this module never imports a world).

Dissection (Bau et al. 2017, as EDDP evaluates on Broden): a direction's detector map at the layer's
resolution (h, w) is upsampled bilinearly to the image (H, W) and thresholded (EDDP: W^T x - b > 0, i.e.
y > 0.5); IoU = |detections and mask| / |detections or mask| summed over the whole dataset. A direction's
label is its best concept if that IoU reaches ``MIN_IOU`` = 0.04 (Network Dissection's threshold for
calling a unit a detector), else ``unlabelled``. S^1 / S^2: ``featinv.explain.dissection``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_IOU = 0.04
GENERIC = "any"


@dataclass
class ConceptSet:
    """Concepts of a world: ``factors`` {factor: [value names]}; ``background_factors`` label background
    pixels (the rest label object pixels); ``generic`` adds any/object and any/background."""
    factors: dict[str, list[str]]
    background_factors: tuple[str, ...] = ("background",)
    generic: bool = True
    coverage: float = 0.5  # a pixel belongs to the object when its coverage is at least this

    @property
    def names(self) -> list[tuple[str, str]]:
        """(factor, value) per concept, in mask order."""
        out = [(f, v) for f, values in self.factors.items() for v in values]
        return out + ([(GENERIC, "object"), (GENERIC, "background")] if self.generic else [])

    def masks(self, object_coverage: Tensor, labels: dict[str, Tensor]) -> Tensor:
        """(N, C, H, W) bool concept masks from object coverage (N, H, W) in [0, 1] and factor labels
        {factor: (N,) value index}."""
        obj = object_coverage >= self.coverage
        bg = ~obj
        out = []
        for f, values in self.factors.items():
            region = bg if f in self.background_factors else obj
            lab = labels[f].to(obj.device)
            for k in range(len(values)):
                out.append(region & (lab == k)[:, None, None])
        if self.generic:
            out += [obj, bg]
        return torch.stack(out, 1)

    def index(self, factor: str, value: str) -> int:
        return self.names.index((factor, value))


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (N, I, h, w) -> (N, I, H, W) (Network Dissection's activation-map scaling)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def dissect(score_maps: Tensor, thresholds: Tensor, masks: Tensor, chunk: int = 64) -> Tensor:
    """Dataset-level IoU (I, C) of detections ``upsample(score_maps) > thresholds`` (score maps (N, I, h, w),
    thresholds (I,)) with concept masks (N, C, H, W). A pair with an empty union gets IoU 0."""
    if score_maps.shape[0] != masks.shape[0]:
        raise ValueError(f"{score_maps.shape[0]} score maps for {masks.shape[0]} masks")
    I, C = score_maps.shape[1], masks.shape[1]
    inter = torch.zeros(I, C, dtype=torch.float64)
    det_sum = torch.zeros(I, dtype=torch.float64)
    mask_sum = torch.zeros(C, dtype=torch.float64)
    t = thresholds.view(1, -1, 1, 1).float()
    for i in range(0, score_maps.shape[0], chunk):
        d = (upsample(score_maps[i:i + chunk].float(), tuple(masks.shape[-2:])) > t)
        a = d.transpose(0, 1).reshape(I, -1).float()                       # (I, n*H*W)
        m = masks[i:i + chunk].transpose(0, 1).reshape(C, -1).float()      # (C, n*H*W)
        inter += (a @ m.T).double()
        det_sum += a.sum(1).double()
        mask_sum += m.sum(1).double()
    union = det_sum[:, None] + mask_sum[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter)).float()


@dataclass
class Labels:
    """Per direction: best concept index, its IoU, (factor, value) or ("unlabelled", "") below MIN_IOU."""
    concept: list[int]
    iou: list[float]
    names: list[tuple[str, str]]

    def factor_counts(self, keep: Optional[Sequence[bool]] = None) -> dict[str, int]:
        """How many (kept) directions carry a label of each factor ("unlabelled" included)."""
        out: dict[str, int] = {}
        for j, (f, _) in enumerate(self.names):
            if keep is None or keep[j]:
                out[f] = out.get(f, 0) + 1
        return out


def label(iou: Tensor, concepts: Sequence[tuple[str, str]], min_iou: float = MIN_IOU) -> Labels:
    """Each direction's label: the concept of highest IoU when it reaches ``min_iou``."""
    best, idx = iou.max(1)
    names = [tuple(concepts[int(c)]) if float(v) >= min_iou else ("unlabelled", "") for v, c in zip(best, idx)]
    return Labels([int(c) for c in idx], [float(v) for v in best], names)
