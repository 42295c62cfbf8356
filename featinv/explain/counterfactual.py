"""Counterfactual interventions along encoding directions (EDDP, arXiv 2509.23926 v2: "counterfactual
interventions"): does moving an image's activations along s_i change the prediction as s_i's label says?

For a direction i labelled with a class c of the classifier (e.g. "circle" for a shape classifier) and
every image n whose prediction (in c's head) is not c, every position of its layer activations moves
along the unit signal vector, x_p -> x_p + delta_i s_i / ||s_i||, and the rest of the network runs from
there (f+). The intervention succeeds when the prediction becomes c:

    success_i = mean_{n : pred(X_n) != c} [ pred(f+(X_n + delta_i s_i/||s_i||)) == c ].

delta_i = k * sigma_i, with sigma_i the standard deviation of the coordinate s_i^T x_p / ||s_i|| over the
positions of the fitting images (a step of k "typical spreads" of that direction) and k a
hyper-parameter chosen on validation images. Control: the same step along ``n_random`` random unit
directions (Gaussian in activation space); its success rate is what a direction with no meaning gets.
Directions whose label is not a class of the classifier (a colour for a shape classifier, a background,
unlabelled) have no counterfactual target (``None``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


def coordinate_spread(X: Tensor, S: Tensor) -> Tensor:
    """sigma_i = std over positions of s_i^T x_p / ||s_i||, (I,). X (N, P, D), S (D, I)."""
    U = S / S.norm(dim=0).clamp_min(1e-12)
    return (X.reshape(-1, X.shape[-1]) @ U).std(0)


@dataclass
class Counterfactual:
    success: list[Optional[float]]   # per direction; None without a class target
    control: list[Optional[float]]   # random directions, same step
    n_images: list[int]              # images whose prediction was not the target before
    target: list[Optional[int]]      # output column of the target class
    step: list[float]                # delta_i

    def mean(self, which: str = "success", keep: Optional[Sequence[bool]] = None) -> Optional[float]:
        vals = [v for j, v in enumerate(getattr(self, which)) if v is not None and (keep is None or keep[j])]
        return sum(vals) / len(vals) if vals else None


@torch.no_grad()
def counterfactuals(split, X: Tensor, S: Tensor, targets: Sequence[Optional[int]], steps: Tensor,
                    n_random: int = 4, seed: int = 0, batch: int = 1024) -> Counterfactual:
    """Success of moving X (N, P, D) along each unit s_i (columns of S) by steps[i] towards class column
    ``targets[i]`` of ``split.f_plus`` (see the module docstring); ``split`` is a ``LayerSplit``."""
    g = torch.Generator().manual_seed(seed)
    slices = split.head_slices()

    def head_of(col: int) -> slice:
        return next(s for s in slices.values() if s.start <= col < s.stop)

    def probs(Z: Tensor) -> Tensor:
        return torch.cat([split.f_plus(Z[i:i + batch]) for i in range(0, len(Z), batch)])

    p0 = probs(X)
    out = Counterfactual([], [], [], list(targets), [float(s) for s in steps])
    for i, c in enumerate(targets):
        if c is None:
            out.success.append(None), out.control.append(None), out.n_images.append(0)
            continue
        sl = head_of(c)
        k = c - sl.start
        todo = p0[:, sl].argmax(1) != k
        Xn = X[todo]
        out.n_images.append(int(todo.sum()))
        if len(Xn) == 0:
            out.success.append(None), out.control.append(None)
            continue
        u = S[:, i] / S[:, i].norm().clamp_min(1e-12)
        out.success.append(float((probs(Xn + steps[i] * u)[:, sl].argmax(1) == k).float().mean()))
        ctrl = []
        for _ in range(n_random):
            r = torch.randn(X.shape[-1], generator=g)
            ctrl.append(float((probs(Xn + steps[i] * r / r.norm())[:, sl].argmax(1) == k).float().mean()))
        out.control.append(sum(ctrl) / len(ctrl))
    return out


def class_targets(labels: Sequence[tuple[str, str]], classes: Sequence[tuple[str, str]]) -> list[Optional[int]]:
    """The output column whose (head, value) equals each direction's (factor, value) label, or None."""
    col = {tuple(c): j for j, c in enumerate(classes)}
    return [col.get(tuple(lab)) for lab in labels]
