"""Validation of encoding directions by activation maximisation (EDDP, arXiv 2509.23926 v2), with featinv.

For an encoding direction s_i at a conv layer, activation maximisation (AM) synthesises images that
maximise the mean projection of the layer's activations on it,

    x* = argmax_x (1/P) sum_p s_i^T x_p(x) / ||s_i||        (``featinv.objectives.Projection``),

here with any featinv method: guided diffusion on an unconditional prior (featinv's core: the prior keeps
the images on the data manifold) or the AM baselines ``pixel`` / ``fourier`` (no prior). A held-out
reader (a judge that never guides) then says whether each image shows the direction's label: a direction
labelled (factor, value) - e.g. (shape, circle) - is *confirmed* by an image whose read factor has that
value. ``on_manifold``: the reader reads every factor with confidence >= 0.9 (a clean scene of the world).

Each (direction, sample) gets its own noise from (seed, "<dataset>/dir<i>", sample), so images do not
depend on batching. The target handed to the method is s_i tiled over the P positions
(``featinv.objectives.tile_direction``), so one batch maximises a different direction per sample.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from featinv.api import run_method
from featinv.objectives import Projection, tile_direction

CONFIDENT = 0.9


def with_projection(method):
    """The method with ``objective = Projection()`` (the direction field comes from the target) unless it
    already has an objective."""
    if getattr(method, "objective", None) is not None:
        return method
    if not dataclasses.is_dataclass(method):
        raise TypeError(f"cannot set an objective on {type(method).__name__}")
    return dataclasses.replace(method, objective=Projection())


@dataclass
class AMImages:
    images: Tensor       # (n_dirs, n_samples, C, H, W)
    projection: Tensor   # (n_dirs, n_samples): (1/P) sum_p s^T x_p / ||s|| of the final image
    seconds: float
    nfe: int


def maximise(method, prior, encoder, S: Tensor, directions: Sequence[int], n_samples: int, *, seed: int = 0,
             dataset: str = "eddp", batch: int = 32, positions: Optional[int] = None) -> AMImages:
    """AM images of ``n_samples`` per direction (columns ``directions`` of S (D, I)) with ``method`` (an
    object of ``featinv.methods``), guided through ``encoder`` (the layer's ``Encoder`` with ``pool=None``,
    whose flattened feature is C-major (C*P,))."""
    if not len(directions):
        raise ValueError("no directions to maximise: pass at least one column index of S")
    method = with_projection(method)
    D = S.shape[0]
    P = positions if positions is not None else encoder.dim // D
    if P * D != encoder.dim:
        raise ValueError(f"encoder feature of dimension {encoder.dim} is not {D} channels x positions")
    jobs = [(i, k) for i in directions for k in range(n_samples)]
    imgs, proj, secs, nfe = [], [], 0.0, 0
    for j in range(0, len(jobs), batch):
        part = jobs[j:j + batch]
        target = torch.stack([tile_direction(S[:, i].float(), P) for i, _ in part])
        keys = [(f"{dataset}/dir{i}", k) for i, k in part]
        r = run_method(method, prior, encoder, target.to(prior.device), keys, seed=seed)
        imgs.append(r.images.cpu())
        proj.append(Projection().projection(r.final_features, r.target))
        secs += r.seconds
        nfe = int(r.nfe.max())
    shape = (len(directions), n_samples)
    return AMImages(torch.cat(imgs).view(*shape, *imgs[0].shape[1:]), torch.cat(proj).view(shape), secs, nfe)


@dataclass
class Readout:
    hit: Tensor          # (n_dirs, n_samples) float: the label's value is read (NaN: label not readable)
    on_manifold: Tensor  # (n_dirs, n_samples) float: every factor read with confidence >= 0.9
    values: dict         # factor -> (n_dirs, n_samples) read value index


def label_value(label: tuple[str, str], factors: dict[str, list[str]]) -> Optional[tuple[str, int]]:
    """(factor, value index) the reader can check for a direction's label, or None (generic / unlabelled)."""
    f, v = label
    if f in factors and v in factors[f]:
        return f, factors[f].index(v)
    return None


@torch.no_grad()
def read(reader, images: Tensor, labels: Sequence[tuple[str, str]], factors: dict[str, list[str]],
         confident: float = CONFIDENT) -> Readout:
    """Read AM images (n_dirs, n_samples, C, H, W) with ``reader.read(images) -> {factor: (value, conf)}``."""
    n_dirs, n = images.shape[:2]
    out = reader.read(images.flatten(0, 1))
    values = {f: v.view(n_dirs, n).cpu() for f, (v, _) in out.items()}
    conf = torch.stack([c.view(n_dirs, n).cpu() for _, c in out.values()])
    hit = torch.full((n_dirs, n), float("nan"))
    for d, lab in enumerate(labels):
        lv = label_value(lab, factors)
        if lv is not None and lv[0] in values:
            hit[d] = (values[lv[0]][d] == lv[1]).float()
    return Readout(hit, (conf >= confident).all(0).float(), values)


def rate(x: Tensor, keep: Optional[Sequence[bool]] = None) -> Optional[float]:
    """Mean over the non-NaN entries of the kept rows (directions); None if there are none."""
    if keep is not None:
        x = x[torch.as_tensor(list(keep), dtype=torch.bool)]
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else None
