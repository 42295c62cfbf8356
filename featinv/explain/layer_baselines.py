"""The synthetic part's baselines on a conv layer: PCA, FastICA, NMF, a sparse autoencoder (unsupervised, K
components each, as many as EDDP's directions) and Pattern-CAV (supervised: one probe per concept, trained
on the concept labels of the positions), fitted on the same positions EDDP is fitted on.

A baseline has no detection threshold of its own (Pattern-CAV: logit > 0); as in the synthetic part each
gets a quantile threshold, and a sign per component for the sign-ambiguous ones (PCA, FastICA), both chosen
on *validation* images: the sign whose detector reaches the higher best IoU, then the quantile q of the
fitting scores maximising S^1 over ``QUANTILES``. ``orient`` returns the components with their signs folded
into S, W and the score, so that every later step (influence along +s_k, counterfactuals) uses the
direction that points to its concept.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from featinv.explain import baselines as B
from featinv.explain.concepts import dissect
from featinv.explain.dissection import s1_score
from featinv.explain.layer import to_map

QUANTILES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def position_labels(masks: Tensor, hw: tuple[int, int]) -> Tensor:
    """Concept labels of the layer's positions (N*P, C): a position is on when at least half of its
    receptive cell (the image area it covers on the map grid) is in the concept's mask."""
    cov = F.adaptive_avg_pool2d(masks.float(), hw)                   # (N, C, h, w)
    return (cov >= 0.5).flatten(2).transpose(1, 2).reshape(-1, masks.shape[1])


def fit_all(flat: Tensor, k: int, labels: Optional[Tensor] = None, seed: int = 0, sae_epochs: int = 100,
            sae_l1: float = 0.05) -> list[B.Components]:
    """PCA, FastICA, NMF and SAE with k components on positions (M, D); Pattern-CAV when ``labels`` (M, C)."""
    comps = [B.pca(flat, k, seed), B.fastica(flat, k, seed), B.nmf(flat, k, seed),
             B.sparse_autoencoder(flat, k, seed, l1=sae_l1, epochs=sae_epochs)]
    if labels is not None:
        keep = labels.any(0) & ~labels.all(0)                          # a probe needs both classes
        pc = B.pattern_cav(flat, labels[:, keep], seed)
        comps.append(pc)
    return comps


def orient(comp: B.Components, signs: Tensor) -> B.Components:
    """The components with sign sigma_k folded in: S, W, score and thresholds all multiplied by sigma."""
    score = comp.score
    return B.Components(comp.name, comp.S * signs, comp.W * signs, lambda x: score(x) * signs,
                        None if comp.thresholds is None else comp.thresholds * signs, signed=False, joint=comp.joint)


@torch.no_grad()
def choose(comp: B.Components, fit_flat: Tensor, X_val: Tensor, hw: tuple[int, int], masks_val: Tensor,
           quantiles=QUANTILES) -> tuple[B.Components, Tensor, dict]:
    """(oriented components, thresholds (K,), choice) chosen on validation activations X_val (N, P, D)."""
    K = comp.S.shape[1]
    signs = torch.ones(K)
    if comp.signed:
        maps = to_map(comp.score(X_val), hw)
        q_fit = comp.score(fit_flat)
        best = {}
        for sg in (1.0, -1.0):
            t = torch.quantile(sg * q_fit, 0.9, dim=0)
            best[sg] = dissect(sg * maps, t, masks_val).max(1).values
        signs = torch.where(best[-1.0] > best[1.0], -1.0, 1.0)
    comp = orient(comp, signs)
    if comp.thresholds is not None:
        return comp, comp.thresholds, {"signs": signs.tolist(), "quantile": None}
    maps = to_map(comp.score(X_val), hw)
    q_fit = comp.score(fit_flat)
    scores = {}
    for q in quantiles:
        scores[q] = s1_score(dissect(maps, torch.quantile(q_fit, q, dim=0), masks_val))
    q = max(scores, key=scores.get)
    return comp, torch.quantile(q_fit, q, dim=0), {"signs": signs.tolist(), "quantile": q, "val_S1": scores}
