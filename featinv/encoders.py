"""Encoders: any torch model + a layer name -> a differentiable feature extractor on [0, 1] images.

``Encoder(img) -> (B, D)``: differentiable preprocessing (resize, 1<->3 channels, normalise,
optional straight-through 8-bit rounding as Shirahama et al. 2025 do before the encoder), then the
model's activation at ``layer`` captured by a forward hook; the forward pass stops right after that
layer, so shallow layers cost a shallow pass.

A module can run several times in one forward pass (torchvision ResNets call each block's ``relu``
three times): ``call`` picks which call is the feature, the **last** by default (the output the
module hands on), or a 0-based index. ``activation(img)`` gives the layer's raw output (e.g. a
(B, C, H, W) map), and ``run_from(img, edit)`` runs the rest of the network with that output
replaced by ``edit(output)`` (interventions, EDDP's f+).

Models are named by one string spec, ``family:name[/weights][@layer][?options]`` (``featinv.specs``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featinv.specs import suggest

__all__ = ["Encoder", "list_layers"]


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
        interpolation: resize mode.
        call: which call of ``layer`` is the feature when the module runs several times per
            forward: ``None`` = the last (default), or a 0-based index.
        name: a label for logs and results.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, *, input_size: int | Sequence[int] | None = None,
                 in_chans: int | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 pool: str | None = None, quantize: bool = False, interpolation: str = "bilinear",
                 call: int | None = None, name: str = ""):
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
        self.call = call
        self._calls: int | None = None  # how often ``layer`` runs per forward (counted once)
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
        return self._to_vector(self.activation(img)).float()

    def _model_input(self, img: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(img)
        dtype = next(self.model.parameters(), torch.empty(0)).dtype
        return x.to(dtype) if dtype.is_floating_point else x

    def _target_call(self, x: torch.Tensor) -> int:
        """0-based index of the call of ``layer`` that is the feature."""
        if self._calls is None:
            count = [0]
            handle = self._module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
            try:
                with torch.no_grad():
                    self.model(x[:1])
            finally:
                handle.remove()
            self._calls = count[0]
            if self._calls == 0:
                raise RuntimeError(f"{self.name}: layer {self.layer!r} did not run in the forward pass")
        k = self._calls - 1 if self.call is None else self.call
        if not 0 <= k < self._calls:
            raise ValueError(f"{self.name}: layer {self.layer!r} runs {self._calls} time(s) per forward; "
                             f"call={self.call} is out of range")
        return k

    def activation(self, img: torch.Tensor) -> torch.Tensor:
        """The raw output of ``layer`` (not pooled or flattened), e.g. (B, C, H, W)."""
        x = self._model_input(img)
        if self._module is None:
            out = self.model(x)
            return next(iter(out.values())) if isinstance(out, dict) else out
        target, seen, store = self._target_call(x), [0], {}

        def hook(_m, _i, o):
            if seen[0] == target:
                store["out"] = o[0] if isinstance(o, (tuple, list)) else o
                raise _Stop
            seen[0] += 1

        handle = self._module.register_forward_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        return store["out"]

    def run_from(self, img: torch.Tensor, edit) -> torch.Tensor:
        """The model's output with ``layer``'s output (the feature's call) replaced by ``edit(output)``."""
        if self._module is None:
            raise ValueError(f"{self.name}: run_from needs a named layer")
        x = self._model_input(img)
        target, seen = self._target_call(x), [0]

        def hook(_m, _i, o):
            k, seen[0] = seen[0], seen[0] + 1
            return edit(o) if k == target else None

        handle = self._module.register_forward_hook(hook)
        try:
            return self.model(x)
        finally:
            handle.remove()

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
        return (f"name={self.name!r}, layer={self.layer!r}, call={self.call}, input_size={self.input_size}, "
                f"pool={self.pool!r}, quantize={self.quantize}")


def list_layers(model: nn.Module) -> list[str]:
    """Names usable as ``layer`` (every named submodule)."""
    return [n for n, _ in model.named_modules() if n]


def _find_layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer in modules and layer:
        return modules[layer]
    raise KeyError(f"unknown layer {layer!r} in {type(model).__name__}.{suggest(layer, modules)} "
                   f"(`featinv layers <encoder>` lists all {len(modules) - 1} names)")
