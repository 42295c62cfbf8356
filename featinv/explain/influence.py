"""Influence of encoding directions on the classes: an RCAV-style test (Pfau et al. 2021, as used by EDDP).

For direction i, every position of every image is moved along the unit signal vector,
x -> x + alpha s_i / ||s_i|| (alpha in activation units, as RCAV steps along a unit CAV), and the rest of the
network is run from the layer on. The influence on class c is the mean change of its probability,

    T_{i,c} = E_n [ p_c(f+(X_n + alpha s_i / ||s_i||)) - p_c(f+(X_n)) ].

Significance by a permutation test, p = (1 + #{|T^null| >= |T|}) / (1 + n_perm) (two-sided); a pair (i, c)
is significant when p < level / (I C) (Bonferroni over all directions and classes). Three nulls; the first two
permute detector i's labels -- its positive set (positions with y_i > 0.5) is replaced by a random set of the
same size -- and differ in the direction they learn from the permuted labels:

* ``test="rcav"`` (default; RCAV, Pfau et al. 2021, as in their code): a CAV, the unit normal of a logistic
  regression (scikit-learn, L2, C = 1) of the permuted positives against as many other positions (at most
  ``cav_samples`` of each), is the null direction. A classifier's normal on random labels is ~ Sigma^-1 times
  noise: it points mostly along low-variance directions of the activations.
* ``test="pattern"`` (stricter): the difference of the means of the permuted positives and the rest, at unit
  length -- a random *pattern*, the same kind of vector as s_i (ŝ = cov[x, z] / var z); ~ Sigma times noise,
  so it points along the high-variance directions the network reads most. Is s_i more influential than a
  random direction shaped like the data?
* ``test="paired"``: the labels "original" / "perturbed" are permuted within each image (random signs of the
  per-image changes): does moving along s_i change p_c at all?
SDC = #directions significant for at least one class; SCDP = #significant (direction, class) pairs.

``shared_null=True`` (``rcav`` and ``pattern``) draws one set of null directions for all directions, with the
median positive-set size: a null direction from m random positions has a distribution that barely depends on m
(at unit length). It costs n_perm instead of I * n_perm null directions and passes through f+ (a
Bonferroni-level test over I directions and C classes needs n_perm >= I C / level permutations *per direction*
otherwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
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
                   positives: Optional[Tensor] = None, batch: int = 4096, test: str = "rcav",
                   tol: float = 1e-6, shared_null: bool = False, cav_samples: int = 1000) -> Influence:
    """Influence of each signal vector ``pairs.S[:, i]`` on every class; see the module docstring.

    ``pairs``: a ``DirectionPairs`` (or anything with ``S`` (D, I), and ``detect`` for the permuted-label nulls);
    ``X``: activations (N, P, D);
    ``f_plus``: (N, P, D) -> logits (or probabilities with ``output="probs"``). ``positives`` (N*P, I) bool
    overrides the detector positives that size the permuted label sets. Mean probability changes smaller
    than ``tol`` (float rounding) are never significant. ``cav_samples``: the most positions of each side a
    null CAV is fitted on (``test="rcav"``)."""
    g = torch.Generator().manual_seed(seed)
    N, P, D = X.shape
    flat = X.reshape(-1, D)
    S = pairs.S
    I = S.shape[1]
    if test not in ("rcav", "pattern", "paired"):
        raise ValueError(f"test must be 'rcav', 'pattern' or 'paired', got {test!r}")
    permuted = test != "paired"
    if positives is None and permuted:
        positives = pairs.detect(flat) > 0.5
    p0 = _probs(f_plus, X, output, batch)

    def changes(v: Tensor) -> Tensor:  # (N, C) per-image change of the class probabilities
        return _probs(f_plus, X + alpha * v / v.norm().clamp_min(1e-12), output, batch) - p0

    per_image = [changes(S[:, i]) for i in range(I)]
    eff = torch.stack([d.mean(0) for d in per_image])
    C = eff.shape[1]
    if 1.0 / (1 + n_perm) >= level / (I * C):
        raise ValueError(f"n_perm={n_perm} cannot reach p < {level}/({I}*{C}): use n_perm >= {math.ceil(I * C / level)}")

    def null_direction(m: int) -> Tensor:  # from m randomly "positive" positions (permuted labels)
        perm = torch.randperm(flat.shape[0], generator=g)
        if test == "pattern":
            return flat[perm[:m]].mean(0) - flat[perm[m:]].mean(0)
        k = min(m, flat.shape[0] - m, cav_samples)
        x = torch.cat([flat[perm[:k]], flat[perm[-k:]]]).double().numpy()
        y = np.r_[np.ones(k), np.zeros(k)]
        return torch.from_numpy(LogisticRegression(max_iter=1000).fit(x, y).coef_[0]).to(flat.dtype)

    null = torch.zeros(I, n_perm, C)
    if shared_null and permuted:
        m = min(max(int(positives.sum(0).float().median()), 1), flat.shape[0] - 1)
        for k in range(n_perm):
            null[:, k] = changes(null_direction(m)).mean(0)
    for i in range(I if not (shared_null and permuted) else 0):
        m = min(max(int(positives[:, i].sum()), 1), flat.shape[0] - 1) if permuted else 0
        for k in range(n_perm):
            if test == "paired":
                signs = torch.randint(0, 2, (N, 1), generator=g).float() * 2 - 1
                null[i, k] = (signs * per_image[i]).mean(0)
            else:
                null[i, k] = changes(null_direction(m)).mean(0)
    exceed = (null.abs() >= eff.abs()[:, None, :] - tol).sum(1)  # changes below tol count as no change
    p = (1 + exceed).float() / (1 + n_perm)
    return Influence(eff, null, p, p < level / (I * C), level)
