"""The shapes world's judges: the factor reader (single mode) and the concept detector (multi mode).

Both are ``nets.ReaderNet`` models trained on renders with all factors independent; they are never an
analysed encoder. ``read_factors`` returns the predicted value index and its softmax confidence per
captioned factor; ``read_presence`` the six concept probabilities.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from featinv.zoo.shapes import world as W
from featinv.zoo.shapes.nets import ReaderNet

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
READER_FILE, DETECTOR_FILE = "shapes-reader.safetensors", "shapes-detector.safetensors"


def _load(cls_heads: dict, path: Path) -> ReaderNet:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `python -m featinv.zoo.train --what shapes-reader,shapes-detector`")
    sd = load_file(str(path))
    width = sd["body.0.weight"].shape[0]
    model = ReaderNet(cls_heads, width=width)
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False)


def load_reader(root: str | Path | None = None) -> ReaderNet:
    """The multi-head factor reader (heads in ``world.FACTORS`` order), eval mode."""
    return _load({k: len(v) for k, v in W.FACTORS.items()}, Path(root or WEIGHTS_DIR) / READER_FILE)


def load_detector(root: str | Path | None = None) -> ReaderNet:
    """The multi-object concept-presence detector (one ``presence`` head of 6 logits, ``world.CONCEPTS``)."""
    return _load({"presence": 6}, Path(root or WEIGHTS_DIR) / DETECTOR_FILE)


@functools.cache
def _default_reader() -> ReaderNet:
    return load_reader()


@torch.no_grad()
def read_factors(images: torch.Tensor, reader: ReaderNet | None = None,
                 batch: int = 1024) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Images (N, 3, 32, 32) in [0, 1] -> ({factor: (N,) int64 value}, {factor: (N,) confidence})."""
    reader = reader or _default_reader()
    outs = [reader.predict(images[i:i + batch].float().clamp(0, 1)) for i in range(0, len(images), batch)]
    values, conf = {}, {}
    for k in W.FACTORS:
        p = torch.cat([o[k] for o in outs]).softmax(1)
        conf[k], values[k] = p.max(1)
    return values, conf


@torch.no_grad()
def read_presence(images: torch.Tensor, detector: ReaderNet | None = None, batch: int = 1024) -> torch.Tensor:
    """Images -> (N, 6) concept-presence probabilities (``world.CONCEPTS`` order)."""
    detector = detector or load_detector()
    return torch.cat([detector.predict(images[i:i + batch].float().clamp(0, 1))["presence"].sigmoid()
                      for i in range(0, len(images), batch)])


def factor_accuracy(reader: ReaderNet, images: torch.Tensor, rows: np.ndarray) -> dict[str, float]:
    """Per-factor share of images whose read value equals the row's, plus ``all`` (every factor right)."""
    values, _ = read_factors(images, reader)
    truth = W.labels(rows)
    ok = {k: values[k] == truth[k] for k in W.FACTORS}
    res = {k: round(float(v.float().mean()), 6) for k, v in ok.items()}
    res["all"] = round(float(torch.stack(list(ok.values())).all(0).float().mean()), 6)
    return res


def presence_accuracy(detector: ReaderNet, images: torch.Tensor, rows: np.ndarray) -> dict[str, float]:
    """Per-concept accuracy of thresholded (0.5) presence, plus ``all`` (the whole table row right)."""
    p = read_presence(images, detector) > 0.5
    truth = W.labels(rows)["presence"]
    res = {c: round(float((p[:, k] == truth[:, k]).float().mean()), 6) for k, c in enumerate(W.CONCEPTS)}
    res["all"] = round(float((p == truth).all(1).float().mean()), 6)
    return res
