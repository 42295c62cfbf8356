"""Encoders with designed properties (the models whose features featinv inverts and probes).

All are ``nets.ShapesCNN`` with circular padding and global average pooling (translation-invariant by
construction), trained on single-object renders whose factors are independent of each other:

* ``shapes-shape``: shape classifier, trained with hue (RGB permutation) and translation augmentation
  and a two-view consistency loss on its feature: designed to keep shape and drop colour and position.
* ``shapes-color``: colour classifier with translation augmentation: keeps colour, drops position.
* ``shapes-invariant``: one shared feature, heads for shape, colour, size and background, translation
  augmentation: keeps those four factors and drops position.

Whether a factor is kept is *measured* by linear probes (``probes.py``), never assumed. Default
feature layer ``penultimate`` (64-d); spatial maps: ``conv1`` (32x32), ``conv2`` (16x16), ``conv3`` (8x8).
"""
from __future__ import annotations

from pathlib import Path

import torch

from featinv.zoo.shapes import world as W
from featinv.zoo.shapes.nets import ShapesCNN

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_LAYER = "penultimate"
SPATIAL_LAYERS = ("conv1", "conv2", "conv3")
DESIGNS = {
    "shapes-shape": dict(heads=["shape"], aug=("hue", "shift", "noise"), consistency=1.0,
                         design="keeps shape; drops colour (hue augmentation + two-view feature consistency) and "
                                "position (circular padding, global pooling, translation augmentation)"),
    "shapes-color": dict(heads=["color"], aug=("shift", "noise"),
                         design="keeps colour; drops position (circular padding, global pooling, translation)"),
    "shapes-invariant": dict(heads=["shape", "color", "size", "background"], aug=("shift", "noise"),
                             design="keeps shape, colour, size, background in one feature; drops position"),
}
NAMES = tuple(DESIGNS)


def build(name: str) -> ShapesCNN:
    heads = {h: len(W.FACTORS[h]) for h in DESIGNS[name]["heads"]}
    return ShapesCNN(heads, width=32, feature_dim=64, global_pool=True, circular=True)


def _aug(names):
    from featinv.zoo.shapes import fit

    fns = {"hue": fit.hue, "shift": fit.shift, "noise": fit.add_noise}

    def aug(x, gen):
        for n in names:
            x = fns[n](x, gen)
        return x
    return aug


def train_encoder(name: str, out: Path, *, seed: int, n: int, steps: int, batch: int, lr: float, n_test: int) -> dict:
    from featinv.zoo.shapes import fit
    from featinv.zoo.provenance import save_weights as _save

    torch.manual_seed(seed)
    model = build(name)
    x, rows = W.load_split("single", "train", n)
    lab = W.labels(rows)
    y = {h: lab[h] for h in model.heads}
    info = fit.fit(name, model, x, y, steps=steps, batch=batch, lr=lr, seed=seed, aug=_aug(DESIGNS[name]["aug"]),
                   consistency=DESIGNS[name].get("consistency", 0.0))
    xt, rt = W.load_split("single", "test", n_test)
    lt = W.labels(rt)
    acc = fit.accuracies(model, xt, {h: lt[h] for h in model.heads})
    _save(model, out / f"{name}.safetensors")
    return dict(file=f"{name}.safetensors", architecture="ShapesCNN(width=32, feature_dim=64, global avg+max pool, circular padding)",
                heads=model.heads, design=DESIGNS[name]["design"], augmentation=list(DESIGNS[name]["aug"]),
                feature_consistency_weight=DESIGNS[name].get("consistency", 0.0),
                feature_consistency_rampup="exp(-5 (1 - s)^2) over the first 40 % of steps (Laine & Aila 2017)",
                default_layer=DEFAULT_LAYER, spatial_layers=list(SPATIAL_LAYERS), params=sum(p.numel() for p in model.parameters()),
                seed=seed, data=dict(mode="single", split="train", n=n), test=dict(split="test", n=n_test),
                test_accuracy=acc, **info)


def load_model(name: str, root: str | Path | None = None) -> ShapesCNN:
    from safetensors.torch import load_file

    if name not in DESIGNS:
        raise KeyError(f"unknown shapes encoder {name!r}; known: {NAMES}")
    path = Path(root or WEIGHTS_DIR) / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `python -m featinv.zoo.train --what {name}`")
    model = build(name)
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
