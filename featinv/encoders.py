"""Encoders: any torch model + a layer name -> a differentiable feature extractor on [0, 1] images.

``Encoder(img) -> (B, D)``: differentiable preprocessing (resize, 1<->3 channels, normalise,
optional straight-through 8-bit rounding as Shirahama et al. 2025 do before the encoder), then the
model's activation at ``layer`` captured by a forward hook; the forward pass stops right after that
layer, so shallow layers cost a shallow pass.

Models are named by one string spec, ``family:name[@layer]`` (see ``build_encoder``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featinv.registry import Registry, load_builtin_families, suggest

__all__ = ["Encoder", "build_encoder", "register_encoder", "list_layers", "ENCODERS"]


class _Stop(Exception):
    """Raised by the hook to end the forward pass once the requested layer has run."""


class Encoder(nn.Module):
    """Image in [0, 1], (B, C, H, W) -> feature (B, D) at ``layer`` of ``model``.

    Args:
        model: any ``nn.Module`` taking a normalised image batch.
        layer: a name from ``model.named_modules()``; ``None`` takes the model's output.
        input_size: (H, W) the model expects; images are resized with ``interpolation``
            ("bilinear" or "bicubic", antialiased; "nearest").
        in_chans: channels the model expects; 1 <-> 3 conversion is done if the image differs.
        mean, std: per-channel normalisation after resizing.
        pool: how a non-flat activation becomes a vector: ``None`` (flatten), ``"cls"`` (token 0
            of a (B, N, D) sequence), ``"avg"`` (mean over spatial dims or tokens).
        quantize: straight-through rounding to 8 bits (the decoded image a user would save).
        name: a label for logs and results.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, *, input_size: int | Sequence[int] | None = None,
                 in_chans: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 pool: str | None = None, quantize: bool = False, interpolation: str = "bilinear", name: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.layer = layer
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else (
            tuple(input_size) if input_size is not None else None)
        self.in_chans = in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) if mean is not None else None, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) if std is not None else None, persistent=False)
        if pool not in (None, "cls", "avg"):
            raise ValueError(f"pool must be None, 'cls' or 'avg', got {pool!r}")
        self.pool = pool
        self.quantize = quantize
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {interpolation!r}")
        self.interpolation = interpolation
        self.name = name or type(model).__name__
        self._module = None if layer is None else _find_layer(model, layer)
        self._dim: int | None = None

    # -- preprocessing -------------------------------------------------------------------------
    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim != 4:
            raise ValueError(f"{self.name}: expected images (B, C, H, W), got shape {tuple(img.shape)}")
        if self.quantize:  # straight-through estimator: forward rounds, backward is identity
            img = img + ((img * 255).round() / 255 - img).detach()
        c = img.shape[1]
        if self.in_chans is not None and c != self.in_chans:
            if c == 1:
                img = img.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:
                img = img[:, :3].mean(1, keepdim=True)
            elif c == 4:
                img = img[:, :3]
            else:
                raise ValueError(f"{self.name}: cannot adapt {c} channels to {self.in_chans}")
        if self.input_size is not None and tuple(img.shape[-2:]) != self.input_size:
            smooth = self.interpolation != "nearest"
            img = F.interpolate(img, size=self.input_size, mode=self.interpolation,
                                align_corners=False if smooth else None, antialias=smooth)
        if self.mean is not None:
            img = (img - self.mean.to(img.dtype)) / self.std.to(img.dtype)
        return img

    # -- forward -------------------------------------------------------------------------------
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(img)
        dtype = next(self.model.parameters(), torch.empty(0)).dtype
        x = x.to(dtype) if dtype.is_floating_point else x
        if self._module is None:
            out = self.model(x)
        else:
            store: dict[str, torch.Tensor] = {}

            def hook(_m, _i, o):
                store["out"] = o[0] if isinstance(o, (tuple, list)) else o
                raise _Stop

            handle = self._module.register_forward_hook(hook)
            try:
                self.model(x)
            except _Stop:
                pass
            finally:
                handle.remove()
            if "out" not in store:
                raise RuntimeError(f"{self.name}: layer {self.layer!r} did not run in the forward pass")
            out = store["out"]
        return self._to_vector(out).float()

    def _to_vector(self, out: torch.Tensor) -> torch.Tensor:
        if isinstance(out, dict):
            out = next(iter(out.values()))
        if self.pool == "cls":
            out = out[:, 0]
        elif self.pool == "avg":
            out = out.mean(dim=tuple(range(2, out.ndim))) if out.ndim == 4 else out.mean(1) if out.ndim == 3 else out
        return out.flatten(1)

    @property
    def dim(self) -> int:
        """Feature dimension (computed once with a dummy forward)."""
        if self._dim is None:
            c = self.in_chans or 3
            h, w = self.input_size or (32, 32)
            p = next(self.model.parameters(), None)
            with torch.no_grad():
                self._dim = self(torch.zeros(1, c, h, w, device=p.device if p is not None else None)).shape[1]
        return self._dim

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layer={self.layer!r}, input_size={self.input_size}, pool={self.pool!r}"


def list_layers(model: nn.Module) -> list[str]:
    """Names usable as ``layer`` (every named submodule)."""
    return [n for n, _ in model.named_modules() if n]


def _find_layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer in modules and layer:
        return modules[layer]
    raise KeyError(f"unknown layer {layer!r} in {type(model).__name__}.{suggest(layer, modules)} "
                   f"(`featinv layers <encoder>` lists all {len(modules) - 1} names)")


# -- registry of string specs -------------------------------------------------------------------
ENCODERS = Registry("encoder", load_builtin_families)
register_encoder = ENCODERS.register


def build_encoder(spec: "str | Encoder", **kw) -> Encoder:
    """Build an encoder from a spec ``family:name[@layer]``, e.g. ``zoo:digits-cnn@penultimate``.

    Families: ``zoo`` (the embedded digits models) and, with the real-model zoo, ``timm``,
    ``torchvision`` and ``clip``. An ``Encoder`` instance passes through unchanged.
    """
    if isinstance(spec, nn.Module):
        return spec
    return ENCODERS.build(spec, **kw)
