"""Scoring recovered directions against a world's ground truth (synthetic experiment of EDDP).

For a method's ``Components`` (K directions) and a world with true encoding directions s_c (c = 1..C), known
activation origin mu (where every signal value is 0) and per-position concept masks / signal values:

1. Detection: component k (with sign sigma, both signs for sign-ambiguous methods) detects at positions where
   sigma * score_k > t. t = the method's own threshold if it has one (EDDP: y > 0.5; Pattern-CAV: logit > 0),
   else the q-quantile of sigma * score_k on the fitting activations (q chosen on a validation seed).
2. Labelling: dataset-level IoU of every (component, sign) with every concept; components are matched one to
   one to concepts by the Hungarian algorithm on IoU (the better sign per pair) - Network Dissection without
   knowing the true directions.
3. For each concept c and its matched (k, sigma):
   * ``iou``: that IoU;
   * ``cos``: cos(sigma s_hat_k, s_c);
   * ``rmse``: signal-value error on the positions where c is on, with the method's own decoding:
     alpha_hat_c = sigma ||s_hat_k|| [(W^T S_hat)^+ W^T (x - mu)]_k, all K components decoded jointly (EDDP's
     definition of signal values, and the coordinates of PCA / ICA / NMF / SAE in their bases), or, for
     methods whose directions are separate probes (Pattern-CAV), one at a time:
     alpha_hat_c = sigma ||s_hat_k|| w_k^T (x - mu) / (w_k^T s_hat_k); units of a unit encoding direction;
   * ``rmse_filter``: the one-at-a-time estimate for every method (the latent factor read by the inner
     product with the filter alone);
   * ``cos_best``: mean cos after matching on |cos| directly (is the direction among the components at all,
     whatever the detectors do).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from featinv.explain.baselines import Components
from featinv.explain.dissection import dissection_iou, match


def _unit(M: Tensor) -> Tensor:
    return M / M.norm(dim=0).clamp_min(1e-12)


def thresholds(comp: Components, fit_flat: Tensor, q: Optional[float]) -> dict[int, Tensor]:
    """{sign: (K,) thresholds} for the signs to try."""
    if comp.thresholds is not None:
        return {1: comp.thresholds}
    if q is None:
        raise ValueError(f"{comp.name} has no own thresholds: give a quantile q")
    s = comp.score(fit_flat)
    return {sg: torch.quantile(sg * s, q, dim=0) for sg in ((1, -1) if comp.signed else (1,))}


@torch.no_grad()
def score_against_truth(comp: Components, X: Tensor, on: Tensor, alpha: Tensor, S_true: Tensor,
                        origin: Tensor, fit_flat: Tensor, q: Optional[float] = None) -> dict:
    """Metrics of one method on test activations X (N, P, D) with masks ``on`` (N, P, C) and signal values
    ``alpha`` (N, P, C). Returns per-concept lists and their means (see the module docstring)."""
    D = X.shape[-1]
    flat = X.reshape(-1, D)
    on_f, alpha_f = on.reshape(-1, on.shape[-1]), alpha.reshape(-1, alpha.shape[-1])
    C = on_f.shape[1]
    scores = comp.score(flat)
    ious = {sg: dissection_iou(sg * scores > t, on_f) for sg, t in thresholds(comp, fit_flat, q).items()}
    stacked = torch.stack(list(ious.values()))             # (n_signs, K, C)
    best, which = stacked.max(0)
    signs = torch.tensor(list(ious.keys()))[which]          # (K, C)
    assign = match(best)
    Z = (flat - origin) @ comp.W
    A_joint = Z @ torch.linalg.pinv(comp.W.T @ comp.S).T                     # (M, K)
    A_one = Z / (comp.W * comp.S).sum(0)
    A = A_joint if comp.joint else A_one
    cos_all = _unit(comp.S).T @ _unit(S_true)               # (K, C)
    out = {"iou": [], "cos": [], "rmse": [], "rmse_filter": []}
    for c in range(C):
        if c not in assign:
            out["iou"].append(0.0), out["cos"].append(0.0)
            out["rmse"].append(float("nan")), out["rmse_filter"].append(float("nan"))
            continue
        k = assign[c]
        sg = float(signs[k, c])
        out["iou"].append(float(best[k, c]))
        out["cos"].append(sg * float(cos_all[k, c]))
        m = on_f[:, c]
        for key, a in (("rmse", A), ("rmse_filter", A_one)):
            est = sg * comp.S[:, k].norm() * a[:, k]
            out[key].append(float((est[m] - alpha_f[m, c]).pow(2).mean().sqrt()))
    best_cos = match(cos_all.abs())
    out["cos_best"] = [float(cos_all[best_cos[c], c].abs()) if c in best_cos else 0.0 for c in range(C)]
    for key in ("iou", "cos", "rmse", "rmse_filter", "cos_best"):
        out[f"{key}_mean"] = float(torch.tensor(out[key]).mean())
    out["min_iou"] = min(out["iou"])
    out["min_cos"] = min(out["cos"])
    return out
