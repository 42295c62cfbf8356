"""Target classifiers with known concept dependence (what the seed systems must recover).

Multi-object mode (DEPICT): ``primary-<concept>`` (label = presence of one concept; 6 models) and
``mixed-<j>`` (label = [presence @ w_j > threshold_j], w_j ~ N(0, 1)^6 drawn from a fixed seed, the
threshold the median of presence @ w_j over the train rows; 5 models). Single-object mode (DEXTER,
DiffEx): ``biased-*`` models whose label factor is 95 % aligned with a bias factor in training (the
remaining 5 % take a uniformly random *other* value) and independent at test, and ``unbiased-*``
counterparts trained on independent factors. Every model is a ``ShapesCNN`` (width 16, flattened 4x4
map: position-aware) with one head ``label``; as an encoder its default output is the logits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featinv.zoo.shapes import world as W
from featinv.zoo.shapes.nets import ShapesCNN

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
FOLDER = "shapes-targets"
BIAS_P = 0.95
N_MIXED = 5
# label factor, bias factor, map label value -> bias value (index)
BIASED = {
    "biased-shape-bg": ("shape", "background", [0, 1, 2, 3]),
    "biased-color-bg": ("color", "background", [0, 1, 2, 3, 0, 1]),
    "biased-shape-color": ("shape", "color", [0, 1, 2, 3]),
    "biased-size-bg": ("size", "background", [0, 1, 2]),
}
UNBIASED = {"unbiased-shape": "shape", "unbiased-color": "color", "unbiased-size": "size",
            "unbiased-position": "position"}


def mixed_weights(j: int) -> np.ndarray:
    return np.random.default_rng(7000 + j).normal(size=6).round(3)


def _slug(concept: str) -> str:
    return concept.replace(" ", "-")


PRIMARY = {f"primary-{_slug(c)}": k for k, c in enumerate(W.CONCEPTS)}
MIXED = [f"mixed-{j}" for j in range(N_MIXED)]
NAMES = tuple(PRIMARY) + tuple(MIXED) + tuple(BIASED) + tuple(UNBIASED)


def num_classes(name: str) -> int:
    if name in BIASED:
        return len(W.FACTORS[BIASED[name][0]])
    if name in UNBIASED:
        return len(W.FACTORS[UNBIASED[name]])
    return 2


def build(name: str, width: int = 16) -> ShapesCNN:
    return ShapesCNN({"label": num_classes(name)}, width=width, feature_dim=32, global_pool=False)


def mode(name: str) -> str:
    return "multi" if name in PRIMARY or name in MIXED else "single"


def label_fn(name: str, threshold: float | None = None):
    """rows -> (N,) int64 labels of target ``name`` (the truth of what it should compute)."""
    if name in PRIMARY:
        return lambda rows: torch.from_numpy(rows["present"][:, PRIMARY[name]].astype(np.int64))
    if name in MIXED:
        w = mixed_weights(MIXED.index(name))
        return lambda rows: torch.from_numpy((rows["present"].astype(float) @ w > threshold).astype(np.int64))
    factor = BIASED[name][0] if name in BIASED else UNBIASED[name]
    return lambda rows: torch.from_numpy(rows[factor].astype(np.int64))


def biased_rows(rows: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """Training rows of a biased target: the bias factor follows the label with probability BIAS_P."""
    label, bias, mapping = BIASED[name]
    out = rows.copy()
    n_bias = len(W.FACTORS[bias])
    aligned = np.asarray(mapping)[rows[label].astype(int)]
    other = (aligned + rng.integers(1, n_bias, len(rows))) % n_bias  # uniformly one of the other values
    out[bias] = np.where(rng.random(len(rows)) < BIAS_P, aligned, other)
    return out


def train_targets(out: Path, *, seed: int, n: int, steps: int, batch: int, lr: float, width: int, n_test: int) -> dict:
    from featinv.zoo.shapes import fit
    from featinv.zoo.provenance import save_weights as _save

    entries = {}
    for i, name in enumerate(NAMES):
        m = mode(name)
        x, rows = W.load_split(m, "train", n)
        entry = dict(mode=m, classes=num_classes(name))
        threshold = None
        if name in MIXED:
            w = mixed_weights(MIXED.index(name))
            threshold = float(np.median(rows["present"].astype(float) @ w))
            entry.update(truth=dict(weights=dict(zip(W.CONCEPTS, w.tolist())), threshold=threshold,
                                    rule="label = [sum_k weights[k] * presence[k] > threshold]"))
        elif name in PRIMARY:
            entry.update(truth=dict(concept=W.CONCEPTS[PRIMARY[name]], rule="label = presence[concept]"))
        elif name in BIASED:
            lab, bias, mapping = BIASED[name]
            rows = biased_rows(rows, name, np.random.default_rng(seed + 100 + i))
            x = W.render(rows)
            entry.update(truth=dict(label_factor=lab, bias_factor=bias, train_alignment=BIAS_P, mapping={
                W.FACTORS[lab][a]: W.FACTORS[bias][b] for a, b in enumerate(mapping)},
                measured_train_alignment=round(float(np.mean(rows[bias] == np.asarray(mapping)[rows[lab]])), 4),
                test="factors independent (balanced)"))
        else:
            entry.update(truth=dict(label_factor=UNBIASED[name], rule="label = factor value; factors independent"))
        fn = label_fn(name, threshold)
        torch.manual_seed(seed + i)
        model = build(name, width)
        info = fit.fit(name, model, x, {"label": fn(rows)}, steps=steps, batch=batch, lr=lr, seed=seed + i,
                       log_every=steps)
        xt, rt = W.load_split(m, "test", n_test)
        yt = fn(rt)
        pred = fit.predict(model, xt)["label"].argmax(1)
        entry.update(test_accuracy=round(float((pred == yt).float().mean()), 6), positive_rate_test=(
            round(float(yt.float().mean()), 4) if entry["classes"] == 2 else None))
        if name in BIASED:
            lab, bias, mapping = BIASED[name]
            al = rt[bias] == np.asarray(mapping)[rt[lab]]
            ok = (pred == yt).numpy()
            entry.update(test_accuracy_bias_aligned=round(float(ok[al].mean()), 6),
                         test_accuracy_bias_conflicting=round(float(ok[~al].mean()), 6))
        entry.update(seed=seed + i, wall_seconds=info["wall_seconds"], final_loss=info["final_loss"])
        _save(model, out / FOLDER / f"{name}.safetensors")
        entries[name] = entry
        print(f"[shapes-targets] {name}: test acc {entry['test_accuracy']:.4f}", flush=True)
    return dict(folder=FOLDER, architecture=f"ShapesCNN(width={width}, feature_dim=32, flattened 4x4 map), head 'label'",
                data=dict(split="train", n=n), test=dict(split="test", n=n_test), steps=steps, batch_size=batch, lr=lr,
                default_output="logits", models=entries)


def load_model(name: str, root: str | Path | None = None) -> ShapesCNN:
    from safetensors.torch import load_file

    if name not in NAMES:
        raise KeyError(f"unknown shapes target classifier {name!r}; known: {NAMES}")
    path = Path(root or WEIGHTS_DIR) / FOLDER / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `python -m featinv.zoo.train --what shapes-targets`")
    sd = load_file(str(path))
    model = build(name, width=sd["conv1.0.weight"].shape[0])
    model.load_state_dict(sd)
    return model.eval().requires_grad_(False)
