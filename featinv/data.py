"""Targets to invert: image folders, feature files, prompts, the embedded digits; one DataModule.

Every item is a dict: ``dataset`` (name), ``index``, ``label`` (-1 if unknown), exactly one of
``image`` (C, H, W in [0, 1]), ``feature`` (D,) or ``text``, and an optional ``prompt`` that
conditions a text-to-image prior for that target; empty tensors / "" stand for absent.
Options are checked when a dataset is built; each problem is one error naming the file or option.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["TargetSource", "ImageTargets", "FeatureTargets", "TextTargets", "DigitsTargets", "ShapesTargets",
           "TargetDataModule"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
_EMPTY = torch.empty(0)


class TargetSource(Dataset):
    """Base class: a named, indexed collection of targets."""

    name: str = "targets"

    def item(self, index: int, label: int = -1, image=_EMPTY, feature=_EMPTY, text: str = "", prompt: str = "") -> dict:
        return {"dataset": self.name, "index": index, "label": int(label), "image": image,
                "feature": feature, "text": text, "prompt": prompt}

    def _limit(self, n: int, limit: int | None) -> int:
        _check_int(limit, "limit", self.name, allow_none=True)
        if n == 0:
            raise ValueError(f"dataset {self.name!r} is empty")
        return n if limit is None else min(n, limit)


def _check_int(v, option: str, dataset: str, allow_none: bool = False, minimum: int = 1) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"dataset {dataset!r}: {option}={v!r} is invalid; it must be an integer >= {minimum}"
                         + (" or null" if allow_none else ""))


class ImageTargets(TargetSource):
    """Images under ``root``: an ``ImageFolder`` layout (class sub-folders -> labels) or a flat folder.

    Images are converted to ``channels`` (1 = grey, 3 = RGB; RGBA, 16-bit and 32-bit float
    handled: a float image is taken as [0, 1], or [0, 255] if its maximum exceeds 1), resized to
    ``size`` if given, and scaled to [0, 1]. Images of different sizes need ``size``.
    """

    def __init__(self, root: str, name: str | None = None, size: int | None = None, channels: int = 3,
                 limit: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        self.name = name or self.root.name
        _check_int(size, "size", self.name, allow_none=True)
        if channels not in (1, 3):
            raise ValueError(f"dataset {self.name!r}: channels={channels!r} is invalid; it must be 1 or 3")
        self.size, self.channels = size, channels
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        classes = sorted({p.parent.name for p in files if p.parent != self.root})
        self.classes = {c: i for i, c in enumerate(classes)}
        self.files = files[: self._limit(len(files), limit)]
        if size is None:
            self._check_sizes()

    def _check_sizes(self) -> None:
        """Images are batched: without ``size`` they must all have one size (headers only are read)."""
        sizes = {}
        for i, path in enumerate(self.files):
            with self._open(path, i) as im:
                sizes.setdefault(im.size, path)
        if len(sizes) > 1:
            shown = ", ".join(f"{w}x{h} ({p.name})" for (w, h), p in list(sizes.items())[:3])
            raise ValueError(f"dataset {self.name!r}: images in {str(self.root)!r} have different sizes ({shown}): "
                             "set `size` (e.g. size: 32) to resize them to one")

    def _open(self, path: Path, i: int):
        from PIL import Image, UnidentifiedImageError

        try:
            return Image.open(path)
        except Image.DecompressionBombError as e:
            raise ValueError(f"cannot read image {str(path)!r} (dataset {self.name!r}, index {i}): it is larger than "
                             f"PIL's decompression-bomb limit ({e}); shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS "
                             "if you trust the file") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"cannot read image {str(path)!r} (dataset {self.name!r}, index {i}): {e}") from None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        with self._open(path, i) as im:
            try:
                im.load()
                arr = _to_array(im, self.channels)
            except (OSError, SyntaxError, ValueError) as e:
                raise ValueError(f"cannot read image {str(path)!r} (dataset {self.name!r}, index {i}): {e}") from None
        img = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        if self.size is not None:
            img = torch.nn.functional.interpolate(img[None], size=(self.size, self.size), mode="bilinear",
                                                  antialias=True, align_corners=False)[0].clamp(0, 1)
        return self.item(i, self.classes.get(path.parent.name, -1), image=img)


def _to_array(im, channels: int) -> np.ndarray:
    """PIL image (any mode: L, RGB, RGBA, I;16, F, P, ...) -> float32 (H, W, C) in [0, 1]."""
    if im.mode == "F":  # 32-bit float (TIFF): [0, 1], or [0, 255] if larger
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("float image contains NaN/inf")
        arr = arr / 255.0 if arr.max() > 1.0 else arr
        arr = np.repeat(arr[..., None], 3, axis=2) if channels == 3 else arr[..., None]
        return np.clip(arr, 0, 1)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        arr = arr / (65535.0 if arr.max() > 255 else 255.0)
        arr = np.repeat(arr[..., None], 3, axis=2) if channels == 3 else arr[..., None]
        return np.clip(arr, 0, 1)
    im = im.convert("L" if channels == 1 else "RGB")  # RGBA: alpha dropped, P: palette applied
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


class FeatureTargets(TargetSource):
    """Target features from a file: ``.pt`` (tensor or dict), ``.npy``/``.npz`` or ``.safetensors``, N x D.

    Dict-like files hold ``key`` (default "features") and optionally ``labels_key``.
    """

    def __init__(self, path: str, name: str | None = None, key: str = "features", labels_key: str = "labels",
                 limit: int | None = None):
        self.path = Path(path)
        self.name = name or self.path.stem
        feats, labels = _load_features(self.path, key, labels_key)
        if feats.ndim != 2:
            raise ValueError(f"{str(self.path)!r}: features must be N x D, got shape {tuple(feats.shape)}")
        n = self._limit(len(feats), limit)
        self.features, self.labels = feats[:n].float(), (labels[:n] if labels is not None else None)

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return self.item(i, int(self.labels[i]) if self.labels is not None else -1, feature=self.features[i])


def _load_features(path: Path, key: str, labels_key: str):
    if not path.exists():
        raise FileNotFoundError(f"feature file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"feature file {str(path)!r} is empty (0 bytes)")
    try:
        return _read_features(path, key, labels_key)
    except Exception as e:  # torch/numpy/safetensors each raise their own kind: one message for all
        if str(path) in str(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"cannot read feature file {str(path)!r}: {first}") from None


def _read_features(path: Path, key: str, labels_key: str):
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    elif suffix in (".npy", ".npz"):
        data = np.load(path, allow_pickle=False)
        data = {k: torch.from_numpy(data[k]) for k in data.files} if suffix == ".npz" else torch.from_numpy(data)
    elif suffix in (".pt", ".pth"):
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{str(path)!r}: unsupported feature file type {suffix!r} (.pt, .npy, .npz, .safetensors)")
    if isinstance(data, torch.Tensor):
        return data, None
    if key not in data:
        raise KeyError(f"{str(path)!r} has no {key!r} entry; it has {sorted(data)}")
    labels = data.get(labels_key)
    return torch.as_tensor(data[key]), (torch.as_tensor(labels).long() if labels is not None else None)


class TextTargets(TargetSource):
    """Text prompts whose target is the encoder's text embedding (CLIP; Shirahama et al. 2025 Fig. 8).
    ``repeats``: each prompt appears that many times in a row (index i is prompt i // repeats), so
    that one run shows several inversions of each prompt (each index has its own noise)."""

    def __init__(self, prompts: list[str] | str, name: str = "text", repeats: int = 1):
        if isinstance(prompts, str):
            if not Path(prompts).is_file():
                raise FileNotFoundError(f"prompt file {prompts!r} does not exist (give a list of prompts or a file)")
            prompts = [ln.strip() for ln in Path(prompts).read_text().splitlines() if ln.strip()]
        self.name = name
        _check_int(repeats, "repeats", name)
        self.prompts = [p for p in prompts for _ in range(repeats)]
        self._limit(len(self.prompts), None)

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return self.item(i, text=self.prompts[i])


class DigitsTargets(TargetSource):
    """The embedded default's held-out digits (scikit-learn digits, featinv's fixed test split)."""

    def __init__(self, split: str = "test", limit: int | None = 64, name: str | None = None):
        from featinv.zoo.digits import load_digits

        self.name = name or f"digits-{split}"
        if split not in ("train", "val", "test"):
            raise ValueError(f"dataset {self.name!r}: split={split!r} is invalid; it must be 'train', 'val' or 'test'")
        images, labels = load_digits(split)
        n = self._limit(len(images), limit)
        self.images, self.labels = images[:n], labels[:n]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.item(i, int(self.labels[i]), image=self.images[i])


class ShapesTargets(TargetSource):
    """Rendered scenes of the shapes world (``featinv.zoo.shapes``): the first ``limit`` scenes of a
    fixed split (``train``/``val``/``test``, disjoint by seed) in ``single`` or ``multi`` mode; the
    label is the shape index (single) or -1 (multi); ``text`` stays empty (image targets)."""

    def __init__(self, split: str = "test", limit: int = 64, mode: str = "single", name: str | None = None):
        from featinv.zoo.shapes import world

        self.name = name or f"shapes-{mode}-{split}"
        if split not in world.SPLITS or mode not in world.MODES:
            raise ValueError(f"dataset {self.name!r}: split must be one of {world.SPLITS} and mode one of "
                             f"{world.MODES}, got split={split!r}, mode={mode!r}")
        _check_int(limit, "limit", self.name)
        self.images, self.rows = world.load_split(mode, split, limit)
        self.labels = torch.as_tensor(self.rows["shape"].astype("int64")) if mode == "single" else None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.item(i, int(self.labels[i]) if self.labels is not None else -1, image=self.images[i])


class TargetDataModule(L.LightningDataModule):
    """Several target datasets -> several predict dataloaders (one per dataset, in order)."""

    def __init__(self, datasets: list[TargetSource], batch_size: int = 16, num_workers: int = 0):
        super().__init__()
        if not datasets:
            raise ValueError("TargetDataModule needs at least one dataset")
        _check_int(batch_size, "batch_size", "data")
        _check_int(num_workers, "num_workers", "data", minimum=0)
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}: set `name` on each")
        self.datasets, self.batch_size, self.num_workers = list(datasets), batch_size, num_workers

    def predict_dataloader(self):
        return [DataLoader(d, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
                for d in self.datasets]
