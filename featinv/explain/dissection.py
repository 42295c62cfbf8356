"""Network-Dissection-style labelling of concept detectors (Bau et al. 2017; EDDP's evaluation).

A detector's map is compared with each concept's mask over the whole dataset: IoU = |A and B| / |A or B|
summed over all images and positions (dataset-level IoU, as in Network Dissection). EDDP's summary scores:

* S^1 = int_0^1 #{detectors with IoU >= xi} dxi, a detector's IoU being that with its best concept (its
  label); the integral equals sum_i max_c IoU(i, c).
* S^2 = int_0^1 #{distinct labels among the detectors with IoU >= xi} dxi; equals
  sum_c max_{i labelled c} IoU(i, c).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def dissection_iou(detector_maps: Tensor, concept_masks: Tensor) -> Tensor:
    """IoU (I, C) of binary detector maps (N, P, I) against binary concept masks (N, P, C) (dataset-level).
    A pair whose union is empty gets IoU 0."""
    if detector_maps.shape[:-1] != concept_masks.shape[:-1]:
        raise ValueError(f"maps {tuple(detector_maps.shape)} and masks {tuple(concept_masks.shape)} differ")
    a = detector_maps.reshape(-1, detector_maps.shape[-1]).float()
    m = concept_masks.reshape(-1, concept_masks.shape[-1]).float()
    inter = a.T @ m
    union = a.sum(0)[:, None] + m.sum(0)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def labels(iou: Tensor) -> Tensor:
    """Each detector's label: the concept of highest IoU, (I,)."""
    return iou.argmax(1)


def s1_score(iou: Tensor) -> float:
    """S^1 = int_0^1 #{i : max_c IoU(i, c) >= xi} dxi = sum_i max_c IoU(i, c)."""
    return float(iou.max(1).values.clamp(0, 1).sum())


def s2_score(iou: Tensor) -> float:
    """S^2 = int_0^1 #{distinct labels of detectors with IoU >= xi} dxi = sum over labels c of the best IoU of a
    detector labelled c."""
    best = iou.max(1)
    total = 0.0
    for c in best.indices.unique():
        total += float(best.values[best.indices == c].max().clamp(0, 1))
    return total


def count_above(iou: Tensor, xi: float, distinct: bool = False) -> int:
    """The integrand of S^1 (``distinct=False``) or S^2 (``distinct=True``) at threshold xi."""
    best = iou.max(1)
    keep = best.values >= xi
    return int(best.indices[keep].unique().numel()) if distinct else int(keep.sum())


def match(score: Tensor, maximize: bool = True) -> dict[int, int]:
    """One-to-one matching of rows (detectors/components) to columns (concepts) maximising the total score
    (Hungarian algorithm, scipy.optimize.linear_sum_assignment). Returns {concept: row}; with fewer rows than
    columns some concepts stay unmatched."""
    s = score.detach().cpu().double().numpy()
    rows, cols = linear_sum_assignment(-s if maximize else s)
    return {int(c): int(r) for r, c in zip(rows, cols)}


def integrate(iou: Tensor, distinct: bool = False, steps: int = 10001) -> float:
    """Numerical int_0^1 of ``count_above`` (a check of the closed forms; midpoint rule)."""
    xs = (np.arange(steps) + 0.5) / steps
    return float(np.mean([count_above(iou, float(x), distinct) for x in xs]))
