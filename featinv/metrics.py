"""Feature-space metrics, per sample (B, D) x (B, D) -> (B,)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sq_l2", "rel_l2", "cosine"]


def sq_l2(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||f - f_s||^2, the distance Shirahama et al. (2025) minimise."""
    return (f.flatten(1) - target.flatten(1)).pow(2).sum(dim=1)


def rel_l2(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||f - f_s||^2 / ||f_s||^2 (Mahendran & Vedaldi 2015's normalised reconstruction error)."""
    return sq_l2(f, target) / target.flatten(1).pow(2).sum(dim=1).clamp_min(1e-12)


def cosine(f: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between features."""
    return F.cosine_similarity(f.flatten(1), target.flatten(1), dim=1, eps=1e-12)
