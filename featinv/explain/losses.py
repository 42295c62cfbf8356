"""The losses of EDDP (Doumanoglou, Driessens, Zarpalas, "Learning Encoding-Decoding Direction Pairs",
arXiv 2509.23926, Sec. D and the synthetic-experiment appendix), one function per loss.

Notation (the paper's): a layer's spatial activations x_p in R^D (one row per position p); I concept
detectors y_p = sigma(W^T x_p - b) with W in R^{DxI} (column w_i = decoding direction) and b in R^I;
q_p = y_p / ||y_p||_1; signal vectors S in R^{DxI} (column s_i = estimated encoding direction).
Functions take ``y`` as (M, I) (M positions), ``x`` as (..., D), ``W``/``S`` as (D, I), ``b`` as (I,).

Where the notes we work from mark a definition as unverified or leave it open, the choice made here is
written in the function's docstring as "Choice:".
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

EPS = 1e-8


def detector_outputs(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """Concept detectors y = sigma(W^T x - b), shape (..., I)."""
    return torch.sigmoid(x @ W - b)


def normalised(y: Tensor) -> Tensor:
    """q_p = y_p / ||y_p||_1 (y >= 0)."""
    return y / (y.sum(-1, keepdim=True) + EPS)


def _entropy_bits(q: Tensor) -> Tensor:
    return -(q * torch.log2(q + EPS)).sum(-1)


# -- directional clustering (step a; CBE) ---------------------------------------------------------------
def sparsity_loss(y: Tensor) -> Tensor:
    """L^s = E_p H(q_p): entropy of the normalised activations; 0 when one detector is on per position.

    Choice: entropy in bits (log2), like L^ma, so it lies in [0, log2 I]."""
    return _entropy_bits(normalised(y)).mean()


def max_activation_loss(y: Tensor) -> Tensor:
    """L^ma = -E_p q_p^T log2 y_p: the cross-entropy of y against its own normalisation q. Asks the detector
    that dominates a position to be fully on (y -> 1): 0 for one-hot y, 1 for y = 0.5 everywhere."""
    return -(normalised(y) * torch.log2(y + EPS)).sum(-1).mean()


def max_margin_loss(W: Tensor) -> Tensor:
    """L^mm = (1/I) sum_i 1/M_i.

    Choice [unverified in the notes]: M_i = 1/||w_i||, the distance between the hyperplanes w_i^T x - b_i = 0
    and = 1 (the SVM geometric margin at functional margin 1), so L^mm = mean_i ||w_i||. The bound L^mm < 8
    then caps how sharp a detector may get, against L^ma which asks for sharp detectors."""
    return W.norm(dim=0).mean()


def inactive_classifier_loss(y: Tensor, tau: float, gamma: float) -> Tensor:
    """L^ic = E_i ReLU(nu - E_p y_{p,i}^gamma) / nu with nu = tau / I: every detector must fire on at least
    about a 1/I share (times tau) of the positions, else it is 'inactive'."""
    nu = tau / y.shape[-1]
    return (torch.relu(nu - (y.clamp_min(0) ** gamma).mean(0)) / nu).mean()


def excessively_active_loss(y: Tensor, rho: float, gamma: float) -> Tensor:
    """L^eac_i = ReLU(E_p y_{p,i}^gamma - rho) / (1 - rho), per detector, shape (I,); reduce with R_SW."""
    return torch.relu((y.clamp_min(0) ** gamma).mean(0) - rho) / (1 - rho)


def sparsity_bound_loss(y: Tensor) -> Tensor:
    """L^sb_i, per detector, shape (I,); reduce with R_SW so that the worst detector dominates.

    Choice [the notes name the loss but not its formula]: the sparsity of the positions a detector claims,
    L^sb_i = sum_p q_{p,i} H(q_p) / sum_p q_{p,i} (bits). L^s is an average over positions that a detector
    sharing its positions with another can hide in; this per-detector soft maximum bounds every detector's."""
    q = normalised(y)
    h = _entropy_bits(q)
    return (q * h[:, None]).sum(0) / (q.sum(0) + EPS)


def self_weighted_softmax(losses: Tensor, nu: float = 4.0) -> Tensor:
    """R_SW({L_k}) = sum_k L_k^{nu+1} / sum_k L_k^nu for L_k >= 0: a soft maximum, between mean and max
    (nu = 0 gives the mean, nu -> inf the max). 0 when all L_k are 0."""
    losses = losses.clamp_min(0)
    return (losses ** (nu + 1)).sum() / ((losses ** nu).sum() + EPS)


# -- uncertainty-region alignment -----------------------------------------------------------------------
def uncertainty_region_points(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """x' = x - (W^T)^+ (W^T x - b) (used by L^uur): the point nearest to x on the intersection of all detector
    hyperplanes {W^T x = b} when I <= D and W has full column rank (least squares otherwise)."""
    return x - (x @ W - b) @ torch.linalg.pinv(W.T).T


def constrained_uncertainty_points(x: Tensor, W: Tensor, b: Tensor, S: Tensor) -> Tensor:
    """x' = x - dx, dx = S (W^T S)^+ (W^T x - b) (used by L^cur): the move onto the detector hyperplanes is only
    along the signal vectors, i.e. it changes the signal values and nothing else."""
    coeff = (x @ W - b) @ torch.linalg.pinv(W.T @ S).T
    return x - coeff @ S.T


def uncertainty_loss(f_plus: Callable[[Tensor], Tensor], x_prime: Tensor, output: str = "logits") -> Tensor:
    """L^uur / L^cur = -E_{X'} H(f+(X')): the network must be uncertain (high predictive entropy, nats) at the
    images whose every position was moved onto the detectors' hyperplanes. ``x_prime`` is (N, P, D)."""
    out = f_plus(x_prime)
    logp = torch.log_softmax(out, -1) if output == "logits" else torch.log(out.clamp_min(EPS))
    return (logp.exp() * logp).sum(-1).mean()


def filter_signal_orthogonality(W: Tensor, S: Tensor) -> Tensor:
    """L^fso = sqrt(E_{i != j} (w_i^T s_j)^2) on unit-normalised columns: filter i must not read signal j."""
    I = W.shape[1]
    if I < 2:
        return W.new_zeros(())
    c = (W / W.norm(dim=0).clamp_min(EPS)).T @ (S / S.norm(dim=0).clamp_min(EPS))
    off = c[~torch.eye(I, dtype=torch.bool, device=W.device)]
    return (off ** 2).mean().sqrt()


# -- step (c): signal-vector initialisation ------------------------------------------------------------
@torch.no_grad()
def signal_vectors(x: Tensor, W: Tensor, b: Tensor, threshold: float = 0.5, min_positives: int = 2) -> Tensor:
    """s_i = cov[x_p, z_{p,i}] / var(z_{p,i}), z = w_i^T x, over the positives of detector i only
    (y_{p,i} > threshold): the Haufe/Kindermans pattern estimator. On the positives the other concepts'
    signal values are independent of z_i, which removes the bias of the all-sample pattern (Pattern-CAV).
    By construction w_i^T s_i = 1. ``x`` is (M, D). A detector with fewer than ``min_positives`` positives
    falls back to the all-sample estimate."""
    y = detector_outputs(x, W, b)
    z = x @ W
    S = torch.empty_like(W)
    for i in range(W.shape[1]):
        pos = y[:, i] > threshold
        if int(pos.sum()) < min_positives:
            pos = torch.ones_like(pos)
        xp, zp = x[pos], z[pos, i]
        xc, zc = xp - xp.mean(0), zp - zp.mean()
        S[:, i] = (xc * zc[:, None]).mean(0) / ((zc ** 2).mean() + EPS)
    return S
