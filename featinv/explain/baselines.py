"""Direction-finding baselines for EDDP's comparisons, on the same activations (positions as samples).

Every method returns ``Components``: K encoding directions ``S`` (D, K), linear decoders ``W`` (D, K) and a
per-position score function (the quantity a detector thresholds). Reconstruction methods (PCA, NMF, FastICA,
the sparse autoencoder) come from maintained libraries (scikit-learn) or plain torch; Pattern-CAV is
supervised (it sees the concept labels) and is EDDP's own reference for signal vectors:

* PCA (sklearn): S = W = the principal axes; score = coordinate along the axis (centred data).
* FastICA (sklearn, unit-variance whitening): S = mixing matrix columns, W = unmixing rows, score = source.
* NMF (sklearn, on the raw non-negative activations): S = components, score = NMF code (NNLS transform);
  W = pinv(S)^T, the least-squares decoder of the dictionary.
* Sparse autoencoder (torch): code = ReLU(E^T (x - b_d) + b_e), x_hat = b_d + S code, unit-norm decoder
  columns, loss ||x - x_hat||^2 + l1 * ||code||_1 (on standardised data); score = code; W = pinv(S)^T.
* Pattern-CAV: per concept a logistic-regression probe (sklearn) on the positions' concept labels; z = probe
  logit; S = cov[x, z] / var z over all positions (Haufe pattern), W = probe weights; detects at z > 0.
  The probes are separate classifiers, not a basis: their signal values are read one direction at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor


@dataclass
class Components:
    name: str
    S: Tensor                         # (D, K) encoding directions
    W: Tensor                         # (D, K) linear decoders (signal values = (W^T S)^+ W^T (x - origin))
    score: Callable[[Tensor], Tensor]  # (M, D) -> (M, K), what a detector thresholds
    thresholds: Optional[Tensor] = None  # (K,) a method's own detection thresholds; None = choose by quantile
    signed: bool = False              # True: the sign of a component is arbitrary (try both)
    joint: bool = True                # signal values decoded jointly, (W^T S)^+ W^T x (False: per direction)


def _np(x: Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _t(a) -> Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def pca(flat: Tensor, k: int, seed: int = 0) -> Components:
    from sklearn.decomposition import PCA

    m = PCA(n_components=k, random_state=seed).fit(_np(flat))
    C = _t(m.components_).T
    mean = _t(m.mean_)
    return Components("PCA", C, C, lambda x: (x - mean) @ C, signed=True)


def fastica(flat: Tensor, k: int, seed: int = 0) -> Components:
    from sklearn.decomposition import FastICA

    m = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=2000, tol=1e-5).fit(_np(flat))
    unmix, mean = _t(m.components_).T, _t(m.mean_)
    return Components("FastICA", _t(m.mixing_), unmix, lambda x: (x - mean) @ unmix, signed=True)


def nmf(flat: Tensor, k: int, seed: int = 0) -> Components:
    from sklearn.decomposition import NMF

    m = NMF(n_components=k, init="nndsvda", random_state=seed, max_iter=2000).fit(_np(flat.clamp_min(0)))
    S = _t(m.components_).T

    def score(x: Tensor) -> Tensor:
        shape = x.shape
        return _t(m.transform(_np(x.reshape(-1, shape[-1]).clamp_min(0)))).reshape(*shape[:-1], k)

    return Components("NMF", S, torch.linalg.pinv(S).T, score)


def sparse_autoencoder(flat: Tensor, k: int, seed: int = 0, l1: float = 0.05, epochs: int = 2000,
                       lr: float = 1e-2, batch_size: int = 1024) -> Components:
    """A one-layer ReLU sparse autoencoder with unit-norm decoder columns, trained with Adam on standardised
    activations (the learned directions are mapped back to the raw space)."""
    g = torch.Generator().manual_seed(seed)
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    xs = (flat - mean) / std
    D = flat.shape[1]
    E = (torch.randn(D, k, generator=g) / D ** 0.5).requires_grad_(True)
    dec = (torch.randn(D, k, generator=g)).requires_grad_(True)
    b_e = torch.zeros(k, requires_grad=True)
    b_d = torch.zeros(D, requires_grad=True)
    opt = torch.optim.Adam([E, dec, b_e, b_d], lr=lr)

    def encode(z: Tensor) -> Tensor:
        return torch.relu((z - b_d) @ E + b_e)

    for _ in range(epochs):
        perm = torch.randperm(xs.shape[0], generator=g)
        for i in range(0, len(perm), batch_size):
            xb = xs[perm[i:i + batch_size]]
            Dn = dec / dec.norm(dim=0)
            code = encode(xb)
            loss = ((code @ Dn.T + b_d - xb) ** 2).sum(1).mean() + l1 * code.abs().sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        Dn = dec / dec.norm(dim=0)
        S = Dn * std[:, None]  # a unit of code moves x by std * d (raw space)
        E_f, b_e_f, b_d_f = E.detach().clone(), b_e.detach().clone(), b_d.detach().clone()

    def score(x: Tensor) -> Tensor:
        return torch.relu(((x - mean) / std - b_d_f) @ E_f + b_e_f)

    return Components("SAE", S, torch.linalg.pinv(S).T, score)


def pattern_cav(flat: Tensor, concept_labels: Tensor, seed: int = 0) -> Components:
    """``concept_labels`` (M, C) bool: one linear probe per concept (supervised)."""
    from sklearn.linear_model import LogisticRegression

    Ws, bs = [], []
    for c in range(concept_labels.shape[1]):
        m = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit(_np(flat), _np(concept_labels[:, c]))
        Ws.append(_t(m.coef_[0]))
        bs.append(float(m.intercept_[0]))
    W, b = torch.stack(Ws, 1), _t(bs)
    z = flat @ W + b
    xc, zc = flat - flat.mean(0), z - z.mean(0)
    S = (xc.T @ zc) / (zc ** 2).sum(0)
    return Components("Pattern-CAV", S, W, lambda x: x @ W + b, thresholds=torch.zeros(len(bs)), joint=False)


def from_pairs(pairs, name: str = "EDDP") -> Components:
    """EDDP's direction pairs as Components: score W^T x - b, detecting at 0 (y > 0.5)."""
    return Components(name, pairs.S, pairs.W, lambda x: x @ pairs.W - pairs.b, thresholds=torch.zeros(pairs.W.shape[1]))
