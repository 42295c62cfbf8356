"""Per-step schedules for guided sampling: guidance weight multipliers and recurrence counts.

Progress p runs from 0 (first sampling step, t = T) to 1 (last step, t = 0).
"""
from __future__ import annotations

import math

import torch

__all__ = ["WEIGHT_SCHEDULES", "weight_multipliers", "recurrence_counts"]

WEIGHT_SCHEDULES = ("constant", "linear_decay", "linear_increase", "cosine_decay", "beta", "alpha", "sigma")


def weight_multipliers(schedule: str, timesteps: list[int], alphas_cumprod: torch.Tensor,
                       window: tuple[float, float] | None = None) -> list[float]:
    """Multiplier of every guidance weight at each sampling step.

    ``constant`` 1; ``linear_decay`` 1 - p; ``linear_increase`` p; ``cosine_decay`` (1 + cos(pi p)) / 2;
    ``beta`` 1 - a_t/a_prev and ``alpha`` a_t/a_prev, normalised to mean 1 (TFG's "decrease" and
    "increase", Ye et al. 2024, Sec. 4); ``sigma`` sqrt(1 - a_t) (Universal Guidance's forward
    scale, Bansal et al. 2023, Eq. 6). ``window`` = (p0, p1) zeroes the weight outside p0 <= p <= p1.
    """
    n = len(timesteps)
    ps = [i / max(n - 1, 1) for i in range(n)]
    acp = alphas_cumprod.double().cpu()

    def ab(t):
        return acp[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)

    if schedule == "constant":
        m = [1.0] * n
    elif schedule == "linear_decay":
        m = [1 - p for p in ps]
    elif schedule == "linear_increase":
        m = ps
    elif schedule == "cosine_decay":
        m = [(1 + math.cos(math.pi * p)) / 2 for p in ps]
    elif schedule in ("beta", "alpha"):
        prev = list(timesteps[1:]) + [-1]
        alpha = [float(ab(t) / ab(tp)) for t, tp in zip(timesteps, prev)]
        m = [1 - a for a in alpha] if schedule == "beta" else alpha
        mean = sum(m) / n
        m = [x / mean for x in m]
    elif schedule == "sigma":
        m = [float((1 - ab(t)).sqrt()) for t in timesteps]
    else:
        raise ValueError(f"unknown weight schedule {schedule!r}; choose from {WEIGHT_SCHEDULES}")
    if n and not all(math.isfinite(x) for x in m):
        raise ValueError(f"weight schedule {schedule!r} is not finite on these timesteps")
    if window is not None:
        p0, p1 = window
        m = [x if p0 <= p <= p1 else 0.0 for x, p in zip(m, ps)]
    return m


def recurrence_counts(steps: int, recurrence: int, early_steps: int = 0, early_recurrence: int = 1,
                      window: tuple[float, float] | None = None) -> list[int]:
    """K(t) per step: ``early_recurrence`` for the first ``early_steps`` steps (Shirahama et al.'s
    early-step emphasis), ``recurrence`` inside ``window`` (all steps if None; FreeDoM's time-travel
    range), 1 elsewhere."""
    ks = []
    for i in range(steps):
        p = i / max(steps - 1, 1)
        inside = window is None or window[0] <= p <= window[1]
        ks.append(early_recurrence if i < early_steps else (recurrence if inside else 1))
    return ks
