"""A deterministic reporter: DEXTER's VLM captions + LLM bias report, replaced by a reader and a rule.

DEXTER (Carnemolla et al., arXiv 2510.14741, steps "reasoner") has a VLM caption every saved frame and an
LLM write a report with the frames' over-represented elements and a bias hypothesis. In a world with
known factors both are replaced by something checkable: a *reader* (a judge trained on renders, never an
analysed model) reads every frame's factors, and the reporter flags each factor other than the class
factor whose most frequent value among the frames exceeds its base rate by at least ``threshold``
(0.3): "the frames over-represent <value> <factor>" is the bias hypothesis. The base rate of a value is its
probability in the world (independent, uniform factors: 1 / #values) unless measured rates are given.

The frames of one optimised prompt share its words, so every factor the prompt names is over-represented
among them whether or not the classifier depends on it. ``sweep_report`` is the counterfactual form of the
same rule: for each non-class factor, the final prompt is sampled with that factor's words swept over all
its values (same seeds); the frames are the samples the classifier assigns to the class, and the base rate
is each value's frequency (as read) among all the sweep's samples - a value is over-represented only if
the classifier prefers it. ``contrast_report`` reads the same sweep by the classifier's hit rate per value:
a factor is flagged if the hit rate of its most and least accepted values differ by ``threshold`` (0.5).
The share-of-hits excess is diluted when the classifier accepts several values: a biased classifier that
assigns the class at the planted position and at the five positions no class is tied to gives that position
a share of about 1/6 (excess 1/6 - 1/9), but a hit-rate contrast near 1 against the positions of other classes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

__all__ = ["Flag", "Report", "report", "sweep_report", "contrast_report", "read_frames"]


@dataclass
class Flag:
    factor: str
    value: str
    frequency: float
    base_rate: float
    excess: float


@dataclass
class Report:
    n_frames: int
    class_factor: str | None
    threshold: float
    flags: list[Flag] = field(default_factory=list)
    frequencies: dict[str, dict[str, float]] = field(default_factory=dict)  # factor -> value -> share of frames
    base_rates: dict[str, dict[str, float]] = field(default_factory=dict)  # factor -> value -> base rate
    rule: str = "frames"  # frames / sweep: share vs base rate; contrast: frequencies = hit rate per value,
    # n_frames = the sweep's hits, rows() = (factor, most accepted value, its hit rate, lowest, contrast, flagged)

    @property
    def flagged_factors(self) -> list[str]:
        return [f.factor for f in self.flags]

    def text(self) -> str:
        """The report as a sentence (what the LLM would write, from the same numbers)."""
        if self.n_frames == 0:
            return "no frame was classified as the target: nothing to report"
        if not self.flags:
            if self.rule == "contrast":
                return f"{self.n_frames} hits; no swept factor moves the classifier's decision"
            return f"{self.n_frames} frames; no factor besides the class is over-represented"
        if self.rule == "contrast":
            parts = [f"{f.value} {f.factor} (the class on {f.frequency:.0%} of its samples vs {f.base_rate:.0%} for "
                     f"the least accepted {f.factor})" for f in self.flags]
            return f"{self.n_frames} frames; the classifier's decision depends on " + "; ".join(parts) + ": possible bias"
        parts = [f"{f.value} {f.factor} ({f.frequency:.0%} of frames vs {f.base_rate:.0%} base rate)" for f in self.flags]
        return f"{self.n_frames} frames over-represent " + "; ".join(parts) + ": possible bias"

    def rows(self) -> list[list]:
        """Table rows (factor, value, frequency, base rate, excess, flagged) of every factor's top value."""
        out = []
        flagged = {f.factor for f in self.flags}
        for k, freq in self.frequencies.items():
            if not freq:
                continue
            v, p = max(freq.items(), key=lambda kv: kv[1])
            base = min(freq.values()) if self.rule == "contrast" else self.base_rates[k][v]
            out.append([k, v, round(p, 4), round(base, 4), round(p - base, 4), k in flagged])
        return out

    def as_dict(self) -> dict:
        return {**asdict(self), "text": self.text()}


def read_frames(judge, frames: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """factor -> (N,) value index as read by ``judge.read`` (``featinv.zoo.shapes.judges.Judge``)."""
    if len(frames) == 0:
        return {}
    parts = [judge.read(frames[i:i + batch]) for i in range(0, len(frames), batch)]
    return {k: torch.cat([p[k][0] for p in parts]).cpu() for k in parts[0]}


def report(readings: dict[str, torch.Tensor], factors: dict[str, list[str]], class_factor: str | None, *,
           threshold: float = 0.3, base_rates: dict[str, list[float]] | None = None) -> Report:
    """Flag every non-class factor whose most frequent value among the frames exceeds its base rate by
    ``threshold`` (module docstring). ``readings``: factor -> (N,) value indices of the N frames."""
    n = len(next(iter(readings.values()))) if readings else 0
    rep = Report(n_frames=n, class_factor=class_factor, threshold=threshold)
    for k, values in factors.items():
        base = base_rates[k] if base_rates and k in base_rates else [1.0 / len(values)] * len(values)
        rep.base_rates[k] = dict(zip(values, map(float, base)))
        if n == 0 or k not in readings:
            continue
        counts = torch.bincount(readings[k].long(), minlength=len(values)).float() / n
        rep.frequencies[k] = {v: round(float(c), 6) for v, c in zip(values, counts)}
        if k == class_factor:
            continue
        _flag(rep, k, values, counts, torch.tensor(base, dtype=counts.dtype), threshold)
    return rep


def sweep_report(readings: dict[str, torch.Tensor], hits: dict[str, torch.Tensor], factors: dict[str, list[str]],
                 class_factor: str | None, *, threshold: float = 0.3) -> Report:
    """The counterfactual rule (module docstring). For each swept factor k: ``readings[k]`` (N_k,) the
    reader's value of k on every sample of the sweep over k's values, ``hits[k]`` (N_k,) bool the samples the
    classifier assigns to the class. Flags k if a value's frequency among the hits exceeds its frequency
    among all N_k samples by ``threshold``; ``n_frames`` counts the hits over all sweeps."""
    rep, swept = _sweep(readings, hits, factors, class_factor, threshold, "sweep")
    for k, values, r, h, n in swept:
        base = n.double() / max(len(r), 1)
        if not h.any():
            continue
        counts = torch.bincount(r[h], minlength=len(values)).double() / int(h.sum())
        rep.frequencies[k] = {v: round(float(c), 6) for v, c in zip(values, counts)}
        _flag(rep, k, values, counts, base, threshold)
    return rep


def contrast_report(readings: dict[str, torch.Tensor], hits: dict[str, torch.Tensor], factors: dict[str, list[str]],
                    class_factor: str | None, *, threshold: float = 0.5, min_count: int = 4) -> Report:
    """The counterfactual rule by hit-rate contrast (module docstring), on ``sweep_report``'s inputs. For each
    swept factor k, the classifier's hit rate among the samples read with each value (values read at least
    ``min_count`` times); k is flagged if the highest and lowest rates differ by ``threshold``, with the most
    accepted value. ``frequencies[k]`` = hit rate per value, ``base_rates[k]`` = each value's share of the
    samples; a flag's frequency / base_rate / excess = highest rate / lowest rate / their difference."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    rep, swept = _sweep(readings, hits, factors, class_factor, threshold, "contrast")
    for k, values, r, h, n in swept:
        hit = torch.bincount(r[h], minlength=len(values)).double()
        rate = {v: float(hit[j] / n[j]) for j, v in enumerate(values) if int(n[j]) >= min_count}
        rep.frequencies[k] = {v: round(x, 6) for v, x in rate.items()}
        if len(rate) < 2:
            continue
        hi, lo = max(rate, key=rate.get), min(rate, key=rate.get)
        if rate[hi] - rate[lo] >= threshold - 1e-9:
            rep.flags.append(Flag(k, hi, rate[hi], rate[lo], rate[hi] - rate[lo]))
    return rep


def _sweep(readings, hits, factors, class_factor, threshold: float, rule: str):
    """The Report of a counterfactual rule, and per swept non-class factor (k, values, readings (N_k,),
    hits (N_k,) bool, per-value counts), with each value's share of the samples as its base rate."""
    rep = Report(n_frames=int(sum(int(h.sum()) for h in hits.values())), class_factor=class_factor,
                 threshold=threshold, rule=rule)
    swept = []
    for k, values in factors.items():
        if k == class_factor or k not in readings:
            continue
        r, h = readings[k].long(), hits[k].bool()
        if len(r) != len(h):
            raise ValueError(f"{k}: {len(r)} readings but {len(h)} hits")
        n = torch.bincount(r, minlength=len(values))
        rep.base_rates[k] = {v: round(float(c) / max(len(r), 1), 6) for v, c in zip(values, n)}
        swept.append((k, values, r, h, n))
    return rep, swept


def _flag(rep: Report, factor: str, values: list[str], counts: torch.Tensor, base: torch.Tensor, threshold: float):
    excess = counts - base
    j = int(excess.argmax())
    if float(excess[j]) >= threshold - 1e-9:
        rep.flags.append(Flag(factor, values[j], float(counts[j]), float(base[j]), float(excess[j])))
