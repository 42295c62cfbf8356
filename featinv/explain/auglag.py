"""A small augmented-Lagrangian helper for inequality-constrained losses: min f s.t. c_k <= bound_k.

EDDP solves its steps (a) and (d) this way (e.g. step (a): min lambda_s L^s + lambda_uur L^uur s.t.
L^ma < 0.8, L^mm < 8, L^ic < 0.1). We use the Powell-Hestenes-Rockafellar form for inequalities: with
g_k = c_k - bound_k (feasible when g_k <= 0), multiplier lambda_k >= 0 and penalty mu > 0,

    penalty = sum_k ( max(0, lambda_k + mu g_k)^2 - lambda_k^2 ) / (2 mu),

which equals lambda_k g_k + mu/2 g_k^2 while the constraint is active and stays flat (no gradient) once it
is satisfied with margin; after an inner minimisation (here: an epoch) the multipliers move by

    lambda_k <- max(0, lambda_k + mu g_k).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor


class AugmentedLagrangian:
    """Multipliers and penalty for constraints ``name -> bound`` (c_name <= bound)."""

    def __init__(self, bounds: Mapping[str, float], mu: float = 1.0, init: float = 0.0):
        if mu <= 0:
            raise ValueError(f"penalty mu must be > 0, got {mu}")
        self.bounds = dict(bounds)
        self.mu = float(mu)
        self.multipliers = {k: float(init) for k in self.bounds}

    def penalty(self, values: Mapping[str, Tensor]) -> Tensor:
        """The differentiable penalty term for the current constraint values (tensors)."""
        total = None
        for k, bound in self.bounds.items():
            lam = self.multipliers[k]
            g = values[k] - bound
            term = (torch.relu(lam + self.mu * g) ** 2 - lam ** 2) / (2 * self.mu)
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no constraints")
        return total

    def update(self, values: Mapping[str, float]) -> dict[str, float]:
        """lambda_k <- max(0, lambda_k + mu (c_k - bound_k)); returns the new multipliers."""
        for k, bound in self.bounds.items():
            self.multipliers[k] = max(0.0, self.multipliers[k] + self.mu * (float(values[k]) - bound))
        return dict(self.multipliers)

    def violations(self, values: Mapping[str, float]) -> dict[str, float]:
        """max(0, c_k - bound_k) per constraint (0 = satisfied)."""
        return {k: max(0.0, float(values[k]) - b) for k, b in self.bounds.items()}
