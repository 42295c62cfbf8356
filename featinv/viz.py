"""Images people look at: comparison grids (targets over inversions) and PNG writing."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

__all__ = ["display", "comparison_grid", "save_png"]


def display(img: torch.Tensor, min_size: int = 64) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> RGB, upscaled (nearest) so small images stay visible."""
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[1] == 1:
        img = img.expand(-1, 3, -1, -1)
    scale = max(1, min_size // max(img.shape[-2:]))
    return F.interpolate(img, scale_factor=scale, mode="nearest") if scale > 1 else img


def comparison_grid(rows: list[torch.Tensor], min_size: int = 64) -> torch.Tensor:
    """Rows of B images each (e.g. [targets, method_1, method_2]) -> one (3, H, W) grid."""
    rows = [display(r, min_size) for r in rows if r is not None and r.numel()]
    size = max(r.shape[-1] for r in rows)
    rows = [F.interpolate(r, size=(size, size), mode="bilinear", antialias=True) if r.shape[-1] != size else r
            for r in rows]
    return make_grid(torch.cat(rows), nrow=rows[0].shape[0], padding=2, pad_value=1.0)


def save_png(img: torch.Tensor, path: str | Path) -> None:
    """Save (C, H, W) or (1, C, H, W) in [0, 1] as PNG (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(img.detach().float().cpu().clamp(0, 1), path)
