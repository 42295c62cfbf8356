"""Small CNNs of the shapes world: the readers (judges) and the analysed encoders/classifiers.

Two deliberately different families, so that no analysed model is its own judge:

* ``ReaderNet`` (readers, concept detector): strided convolutions, GroupNorm, SiLU, a flattened 4x4 map
  (position-aware), one linear head per factor.
* ``ShapesCNN`` (encoders, target classifiers): 3x3 convs, BatchNorm, ReLU, max-pooling; named
  layers ``conv1`` (one conv, w x 32x32), ``conv2`` (two convs, 2w x 16x16), ``conv3`` (2w x 8x8: the spatial map EDDP
  reads), ``pool`` (global average and max -> 4w, position-invariant; or a flattened 4x4 map), ``penultimate``
  (linear -> ``feature_dim``, ReLU: the default feature) and ``head`` (logits of all heads concatenated).
  ``circular=True`` pads convolutions circularly: with global pooling the model is then translation-
  invariant by construction (up to max-pool phase), the design of the position-dropping encoders.

Every model takes images (B, 3, 32, 32) in [0, 1] directly.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ReaderNet", "ShapesCNN", "split_logits"]


def split_logits(logits: torch.Tensor, heads: dict[str, int]) -> dict[str, torch.Tensor]:
    """Concatenated logits (B, sum C) -> {head: (B, C)} in ``heads`` order."""
    return dict(zip(heads, logits.split(list(heads.values()), dim=1)))


class ReaderNet(nn.Module):
    """Multi-head reader: conv(3->c) s1, then stride-2 convs to 4x4, flatten, linear 256, heads."""

    def __init__(self, heads: dict[str, int], width: int = 48):
        super().__init__()
        self.heads = dict(heads)
        c = width

        def conv(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(*conv(3, c, 1), *conv(c, c, 2), *conv(c, 2 * c, 1), *conv(2 * c, 2 * c, 2),
                                  *conv(2 * c, 2 * c, 2), nn.Flatten(), nn.Linear(2 * c * 16, 256), nn.SiLU())
        self.head = nn.Linear(256, sum(self.heads.values()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{head: logits (B, C)}."""
        return split_logits(self(x), self.heads)


class GlobalAvgMaxPool(nn.Module):
    """(B, C, H, W) -> (B, 2C): global average and global max per channel (translation-invariant; the
    max keeps a small object's evidence from being diluted by the background)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)


class ShapesCNN(nn.Module):
    """conv1 (32x32) - conv2 (16x16) - conv3 (8x8) - pool - penultimate - head (see module doc)."""

    def __init__(self, heads: dict[str, int], width: int = 32, feature_dim: int = 64, global_pool: bool = True,
                 circular: bool = False):
        super().__init__()
        self.heads = dict(heads)
        w, pad = width, ("circular" if circular else "zeros")

        def conv(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, padding_mode=pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        def pair(cin, cout):
            return nn.Sequential(*conv(cin, cout), *conv(cout, cout))

        self.conv1 = nn.Sequential(*conv(3, w))
        self.conv2 = nn.Sequential(nn.MaxPool2d(2), pair(w, 2 * w))
        self.conv3 = nn.Sequential(nn.MaxPool2d(2), pair(2 * w, 2 * w))
        self.pool = GlobalAvgMaxPool() if global_pool else nn.Sequential(nn.MaxPool2d(2), nn.Flatten())
        self.penultimate = nn.Sequential(nn.Linear(2 * w * (2 if global_pool else 16), feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, sum(self.heads.values()))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The ``penultimate`` feature (B, feature_dim)."""
        return self.penultimate(self.pool(self.conv3(self.conv2(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return split_logits(self(x), self.heads)
