"""Influence of encoding directions on the classes: an RCAV-style test (Pfau et al. 2021, as used by EDDP).

For direction i, every position of every image is moved along the signal vector, x -> x + alpha s_i (this
raises signal value i by alpha when w_i^T s_i = 1), and the rest of the network is run from the layer on.
The influence on class c is the mean change of its probability,

    T_{i,c} = E_n [ p_c(f+(X_n + alpha s_i)) - p_c(f+(X_n)) ].

Significance by a label-permutation test (RCAV: "CAVs trained on permuted concept labels"): the positive set
of detector i (positions with y_i > 0.5) is replaced by a random set of the same size; the null direction is
the difference of the means of the permuted positives and negatives, rescaled to ||s_i|| (a random direction
shaped like the data, of the same length). p = (1 + #{|T^null| >= |T|}) / (1 + n_perm), two-sided; a pair
(i, c) is significant when p < level / (I C) (Bonferroni over all directions and classes).
SDC = #directions significant for at least one class; SCDP = #significant (direction, class) pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass
class Influence:
    effect: Tensor       # (I, C) T_{i,c}
    null: Tensor         # (I, n_perm, C) permutation-null effects
    p_values: Tensor     # (I, C)
    significant: Tensor  # (I, C) bool, Bonferroni-corrected
    level: float

    @property
    def sdc(self) -> int:
        """#directions significant for at least one class."""
        return int(self.significant.any(1).sum())

    @property
    def scdp(self) -> int:
        """#significant (direction, class) pairs."""
        return int(self.significant.sum())


def _probs(f_plus, X: Tensor, output: str, batch: int) -> Tensor:
    outs = [f_plus(X[i:i + batch]) for i in range(0, X.shape[0], batch)]
    out = torch.cat(outs)
    return out.softmax(-1) if output == "logits" else out


@torch.no_grad()
def rcav_influence(pairs, X: Tensor, f_plus: Callable[[Tensor], Tensor], alpha: float = 1.0,
                   n_perm: int = 200, seed: int = 0, level: float = 0.05, output: str = "logits",
                   positives: Optional[Tensor] = None, batch: int = 4096) -> Influence:
    """Influence of each signal vector ``pairs.S[:, i]`` on every class; see the module docstring.

    ``pairs``: a ``DirectionPairs`` (or anything with ``S`` (D, I) and ``detect``); ``X``: activations (N, P, D);
    ``f_plus``: (N, P, D) -> logits (or probabilities with ``output="probs"``). ``positives`` (N*P, I) bool
    overrides the detector positives that size the permuted label sets."""
    g = torch.Generator().manual_seed(seed)
    N, P, D = X.shape
    flat = X.reshape(-1, D)
    S = pairs.S
    I = S.shape[1]
    if positives is None:
        positives = pairs.detect(flat) > 0.5
    p0 = _probs(f_plus, X, output, batch)

    def effect(v: Tensor) -> Tensor:
        return (_probs(f_plus, X + alpha * v, output, batch) - p0).mean(0)

    eff = torch.stack([effect(S[:, i]) for i in range(I)])
    C = eff.shape[1]
    if 1.0 / (1 + n_perm) >= level / (I * C):
        raise ValueError(f"n_perm={n_perm} cannot reach p < {level}/({I}*{C}): use n_perm >= {math.ceil(I * C / level)}")
    null = torch.zeros(I, n_perm, C)
    for i in range(I):
        m = int(positives[:, i].sum())
        m = min(max(m, 1), flat.shape[0] - 1)
        norm = S[:, i].norm()
        for k in range(n_perm):
            perm = torch.randperm(flat.shape[0], generator=g)
            v = flat[perm[:m]].mean(0) - flat[perm[m:]].mean(0)
            null[i, k] = effect(v / v.norm().clamp_min(1e-12) * norm)
    exceed = (null.abs() >= eff.abs()[:, None, :] - 1e-12).sum(1)
    p = (1 + exceed).float() / (1 + n_perm)
    return Influence(eff, null, p, p < level / (I * C), level)
