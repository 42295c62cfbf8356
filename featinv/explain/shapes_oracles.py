"""The shapes world wired to DEPICT and DiffEx: its oracles (the renderer), its judges (concept
detector, factor reader) and its target classifiers with known concept dependence.

* DEPICT (multi-object scenes): ``RendererOracle`` turns a permuted concept table into exact
  counterfactual scenes (``world.permute`` keeps the other objects' pixels); ``multi_caption`` is
  the caption grammar; ``presence_detector`` the concept detector h; ``target_labels`` the outcome
  each target classifier was trained to compute.
* DiffEx (single-object scenes): ``RendererEditor`` applies a keyword's edit exactly
  (``world.edit``: one factor of the row changed, re-rendered); ``keyword_factor`` maps a hierarchy
  leaf to its (factor, value); ``factor_reader`` reads every factor for edit success and leakage.

The world is imported here, never by the core (``depict``, ``diffex``, ``gradcam``).
"""
from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featinv.zoo.shapes import world as W

__all__ = ["multi_caption", "RendererOracle", "FACTORS", "factor_table", "single_caption", "FactorOracle",
           "factor_detector", "presence_detector", "factor_reader", "target_classifier",
           "target_labels", "target_truth", "concept_masks", "RendererEditor", "keyword_factor", "target_meta",
           "CONCEPTS", "TARGET_LAYER", "parse_caption", "rewrite_caption", "read_captions", "partial_captions",
           "context_edits"]

CONCEPTS = list(W.CONCEPTS)
FACTORS = list(W.FACTORS)  # the captioned factors of single-object scenes: DEPICT's categorical columns
TARGET_LAYER = "conv3"  # the target classifiers' last spatial map (8x8), where Grad-CAM reads
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "zoo" / "weights"


# -- DEPICT --------------------------------------------------------------------------------------
def multi_caption(presence_row: np.ndarray) -> str:
    """The grammar's caption of a concept-presence row ("1 red circle, 1 blue rectangle")."""
    row = np.zeros(1, W.MULTI_DTYPE)
    row["present"][0] = np.asarray(presence_row, dtype=bool)
    return W.caption(row[0])


class RendererOracle:
    """DEPICT's oracle generator: scene ``s`` of ``rows`` with its presence replaced, re-rendered."""

    def __init__(self, rows: np.ndarray):
        if W.mode_of(rows) != "multi":
            raise ValueError("RendererOracle takes multi-object rows")
        self.rows = rows

    def __call__(self, presence: np.ndarray, scenes: np.ndarray) -> torch.Tensor:
        return W.render(W.permute(self.rows[np.asarray(scenes)], presence))


def factor_table(rows: np.ndarray) -> np.ndarray:
    """(N, 5) int: the captioned factor values of single-object rows (``FACTORS`` order) -- DEPICT's table
    when a classifier of single-object scenes is explained by permuting factors instead of concepts."""
    return np.stack([rows[f].astype(np.int64) for f in FACTORS], 1)


def single_caption(values: np.ndarray) -> str:
    """The grammar's caption of a factor-table row ("a small red triangle at the top left on a gray background")."""
    row = np.zeros(1, W.SINGLE_DTYPE)
    for f, v in zip(FACTORS, values):
        row[f] = int(v)
    return W.caption(row[0])


class FactorOracle:
    """DEPICT's oracle for single-object scenes: scene ``s`` with its captioned factors replaced by a table
    row (position jitter and rotation kept), re-rendered."""

    def __init__(self, rows: np.ndarray):
        if W.mode_of(rows) != "single":
            raise ValueError("FactorOracle takes single-object rows")
        self.rows = rows

    def __call__(self, table: np.ndarray, scenes: np.ndarray) -> torch.Tensor:
        out = self.rows[np.asarray(scenes)].copy()
        for k, f in enumerate(FACTORS):
            out[f] = np.asarray(table)[:, k]
        return W.render(out)


def concept_masks(rows: np.ndarray) -> torch.Tensor:
    """(N, 6, 32, 32) per-concept coverage of multi-object rows (zero where absent)."""
    return W.masks(rows)["concepts"]


class _Presence(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, images):
        return self.net.predict(images.float().clamp(0, 1))["presence"].sigmoid()


def presence_detector(root: str | Path | None = None) -> nn.Module:
    """The concept detector h: images -> (N, 6) presence probabilities (``CONCEPTS`` order)."""
    from featinv.zoo.shapes.reader import load_detector

    return _Presence(load_detector(root)).eval()


@functools.cache
def target_meta(root: str | None = None) -> dict:
    """The target classifiers' entry of meta.json (truth, test accuracy) -- written when they are trained."""
    path = Path(root or WEIGHTS_DIR) / "meta.json"
    meta = json.loads(path.read_text()).get("shapes-targets") if path.exists() else None
    if meta is None:
        raise FileNotFoundError(f"{path} has no 'shapes-targets' entry: train them with "
                                "`python -m featinv.zoo.train --what shapes-targets`")
    return meta


def target_classifier(name: str, root: str | Path | None = None) -> nn.Module:
    """A target classifier (``featinv.zoo.shapes.targets.NAMES``): images -> logits."""
    from featinv.zoo.shapes.targets import load_model

    return load_model(name, root)


def target_truth(name: str, root: str | None = None) -> dict:
    return target_meta(root)["models"][name]["truth"]


def target_labels(name: str, rows: np.ndarray, root: str | None = None) -> np.ndarray:
    """(N,) the label the target classifier ``name`` was trained to output for ``rows`` (its truth)."""
    from featinv.zoo.shapes import targets

    threshold = target_truth(name, root).get("threshold") if name in targets.MIXED else None
    return targets.label_fn(name, threshold)(rows).numpy()


# -- DiffEx --------------------------------------------------------------------------------------
def keyword_factor(keyword: str) -> tuple[str, int]:
    """A hierarchy leaf (a value of one captioned factor, e.g. "red", "top left") -> (factor, value index)."""
    hits = [(f, vals.index(keyword)) for f, vals in W.FACTORS.items() if keyword in vals]
    if len(hits) != 1:
        raise KeyError(f"keyword {keyword!r} is {'ambiguous' if hits else 'not a value of any factor'} in the "
                       f"shapes world ({hits})")
    return hits[0]


class RendererEditor:
    """DiffEx's oracle editor: every keyword edit applied exactly to the scene's row (``world.edit``)
    and re-rendered; deterministic, so its seeds are ignored. A family (level-1) keyword is not a
    single edit: the oracle scores it through its leaves (``featinv.explain.diffex``)."""

    exact = True

    def __init__(self, rows: np.ndarray):
        if W.mode_of(rows) != "single":
            raise ValueError("RendererEditor takes single-object rows")
        self.rows = rows

    def edit(self, leaf: str, seed: int = 0) -> torch.Tensor:
        factor, value = keyword_factor(leaf)
        return W.render(W.edit(self.rows, factor, value))


@functools.lru_cache(maxsize=1)
def partial_captions() -> dict[str, tuple[str, int]]:
    """Every one-factor partial caption of the grammar ("a star", "a red shape", "a shape in the center", ...)
    -> (factor, value index): the phrasings of configs/explain/hierarchy_shapes.yaml."""
    row = W.sample_rows(1, 0)[0]
    out = {}
    for f, vals in W.FACTORS.items():
        for k in range(len(vals)):
            out[W.caption(W.edit(row[None], f, k)[0], keep=[f])] = (f, k)
    return out


@functools.lru_cache(maxsize=1)
def _full_captions() -> dict[str, tuple[int, ...]]:
    """Every full single-object caption of the grammar -> its factor values (``world.caption`` inverted by
    enumeration: 2,592 captions, so the grammar is written once, in the world)."""
    rows = np.zeros(int(np.prod([len(v) for v in W.FACTORS.values()])), W.SINGLE_DTYPE)
    for f, values in zip(W.FACTORS, zip(*itertools.product(*(range(len(v)) for v in W.FACTORS.values())))):
        rows[f] = values
    return {c: tuple(int(r[f]) for f in W.FACTORS) for c, r in zip(W.captions(rows), rows)}


def parse_caption(text: str) -> np.ndarray:
    """A full single-object caption of the grammar -> a row with those factors (nuisances zero); the inverse
    of ``world.caption``."""
    values = _full_captions().get(text)
    if values is None:
        raise ValueError(f"not a full caption of the shapes grammar: {text!r}")
    row = np.zeros((), W.SINGLE_DTYPE)
    for f, v in zip(W.FACTORS, values):
        row[f] = v
    return row


def context_edits(images: torch.Tensor, reader: nn.Module) -> dict:
    """``LeditsEditor`` arguments for in-context edits of single-object ``images``: their captions as the reader
    reads them and ``rewrite_caption``."""
    return dict(captions=read_captions(images, reader), rewrite=rewrite_caption)


def rewrite_caption(prompt: str, caption: str) -> str:
    """In-context DiffEx edit (``LeditsEditor(captions=..., rewrite=...)``): ``caption`` with the factor value
    that the partial-caption ``prompt`` names put in ("a star", "a small red circle at the top left on a gray
    background" -> "a small red star at the top left on a gray background")."""
    hit = partial_captions().get(prompt)
    if hit is None:
        raise KeyError(f"{prompt!r} is not a one-factor partial caption of the shapes grammar")
    return W.caption(W.edit(parse_caption(caption)[None], *hit)[0])


def read_captions(images: torch.Tensor, reader: nn.Module) -> list[str]:
    """Full captions of single-object images as ``reader`` reads them (the stand-in for DiffEx's VLM)."""
    values = reader(images)
    rows = np.zeros(len(images), W.SINGLE_DTYPE)
    for f in W.FACTORS:
        rows[f] = values[f].cpu().numpy()
    return W.captions(rows)


class _Reader(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, images) -> dict[str, torch.Tensor]:
        from featinv.zoo.shapes.reader import read_factors

        return read_factors(images, self.net)[0]


class _FactorValues(nn.Module):
    def __init__(self, reader):
        super().__init__()
        self.reader = reader

    @torch.no_grad()
    def forward(self, images) -> torch.Tensor:
        values = self.reader(images)
        return torch.stack([values[f] for f in FACTORS], 1)


def factor_detector(root: str | Path | None = None) -> nn.Module:
    """DEPICT's detector for a factor table: images -> (N, 5) factor values read by the reader."""
    return _FactorValues(factor_reader(root)).eval()


def factor_reader(root: str | Path | None = None) -> nn.Module:
    """The factor reader: images -> {factor: (N,) value index} (``world.FACTORS``)."""
    from featinv.zoo.shapes.reader import load_reader

    return _Reader(load_reader(root)).eval()
