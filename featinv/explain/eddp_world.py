"""EDDP on a conv layer of a classifier in a world with pixel-labelled concepts (issue 15, "shapes world").

``explain_layer`` runs the paper's pipeline (Doumanoglou et al., arXiv 2509.23926) on a ``LayerSplit``:

1. activations X (N, P, D) of the *fitting* images (unlabelled: EDDP never sees the masks);
2. ``fit_eddp``: direction pairs (w_i, b_i) and signal vectors s_i, with the uncertainty-region losses
   L^uur / L^cur evaluated through f+ (``featinv.explain.eddp``);
3. labels on the *evaluation* images: Network Dissection IoU of every detector map (W^T x - b > 0,
   upsampled) with every concept mask, S^1 and S^2 (``featinv.explain.concepts``, ``dissection``);
4. influence of every s_i on every class: RCAV perturbation X + alpha s_i / ||s_i|| with a permutation
   test, Bonferroni over directions x classes, both nulls (``featinv.explain.influence``); alpha = the
   median over directions of the coordinate spread sigma_i (``counterfactual.coordinate_spread``), so
   the step is in the layer's own units;
5. counterfactuals: moving images along s_i towards the class its label names (``counterfactual``).

The same steps score any ``featinv.explain.baselines.Components`` (PCA, FastICA, NMF, SAE, Pattern-CAV)
through ``score_components``. Plain PyTorch; models, images and masks are arguments.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from featinv.explain.baselines import Components, from_pairs
from featinv.explain.concepts import MIN_IOU, ConceptSet, Labels, dissect, label
from featinv.explain.counterfactual import Counterfactual, class_targets, coordinate_spread, counterfactuals
from featinv.explain.dissection import s1_score, s2_score
from featinv.explain.eddp import PRESETS, DirectionPairs, EDDPConfig, fit_eddp
from featinv.explain.influence import rcav_influence
from featinv.explain.layer import LayerSplit, to_map


@dataclass
class WorldData:
    """Images (N, C, H, W) in [0, 1], concept masks (N, n_concepts, H, W) bool, factor labels {f: (N,)}."""
    images: Tensor
    masks: Tensor
    labels: dict


@dataclass
class LayerConfig:
    """Hyper-parameters of ``explain_layer`` besides EDDP's own (``eddp``: a preset name or an EDDPConfig)."""
    n_directions: int = 16
    eddp: object = "fast"
    n_perm: Optional[int] = None  # None: 2 * ceil(I * classes / level), so p can reach half the Bonferroni level
    level: float = 0.05
    cf_k: float = 2.0          # counterfactual step, in coordinate spreads sigma_i
    n_random: int = 4          # random control directions per counterfactual
    min_iou: float = MIN_IOU
    tests: tuple = ("rcav", "pattern", "paired")  # the influence nulls (``influence`` docstring)
    shared_null: bool = True   # one null set for all directions (rcav, pattern; ``influence`` docstring)
    influence_images: Optional[int] = 256  # evaluation images the influence test runs on (None: all)
    influence_on: str = "probabilities"  # what the influence test measures: "probabilities" (RCAV) or "logits"

    def __post_init__(self):
        if self.influence_on not in ("probabilities", "logits"):
            raise ValueError(f"influence_on={self.influence_on!r} is invalid; it must be 'probabilities' or 'logits'")

    def eddp_config(self) -> EDDPConfig:
        return PRESETS[self.eddp] if isinstance(self.eddp, str) else self.eddp


@dataclass
class LayerReport:
    """What EDDP (or a baseline) says about a layer, on the evaluation images."""
    method: str
    S: Tensor                         # (D, I) encoding directions
    iou: Tensor                       # (I, n_concepts)
    labels: Labels
    concepts: list
    classes: list                     # (head, value) per f+ output column
    influence: dict                   # test -> Influence
    counterfactual: Counterfactual
    alpha: float                      # RCAV step (activation units)
    pairs: Optional[DirectionPairs] = None
    seconds: dict = field(default_factory=dict)

    @property
    def s1(self) -> float:
        return s1_score(self.iou)

    @property
    def s2(self) -> float:
        return s2_score(self.iou)

    def significant(self, test: str = "rcav") -> list[bool]:
        return self.influence[test].significant.any(1).tolist()

    def label_share(self, factor: str, test: str = "rcav") -> Optional[float]:
        """Share of the significant directions whose label is of ``factor`` (None if none is significant)."""
        sig = self.significant(test)
        n = sum(sig)
        return sum(1 for s, (f, _) in zip(sig, self.labels.names) if s and f == factor) / n if n else None

    def rows(self) -> list[dict]:
        """One row per direction: label, IoU, significance, strongest class effect, counterfactual."""
        out = []
        for i, (f, v) in enumerate(self.labels.names):
            row = {"direction": i, "label_factor": f, "label_value": v, "iou": round(self.labels.iou[i], 4)}
            for t, inf in self.influence.items():
                row[f"significant_{t}"] = bool(inf.significant[i].any())
                row[f"n_classes_{t}"] = int(inf.significant[i].sum())
            eff = self.influence[next(iter(self.influence))].effect[i]
            j = int(eff.argmax())
            row["top_class"] = "/".join(self.classes[j])
            row["top_effect"] = round(float(eff[j]), 5)
            cf = self.counterfactual
            row["cf_success"] = cf.success[i]
            row["cf_control"] = cf.control[i]
            row["cf_images"] = cf.n_images[i]
            out.append(row)
        return out

    def summary(self) -> dict:
        out = {"method": self.method, "n_directions": self.S.shape[1], "S1": round(self.s1, 4), "S2": round(self.s2, 4),
               "labelled": sum(f != "unlabelled" for f, _ in self.labels.names), "alpha": self.alpha}
        for t, inf in self.influence.items():
            out[f"SDC_{t}"], out[f"SCDP_{t}"] = inf.sdc, inf.scdp
            sig = self.significant(t)
            for factor, n in self.labels.factor_counts(sig).items():
                out[f"sig_{t}_{factor}"] = n
        out["cf_success"] = self.counterfactual.mean("success")
        out["cf_control"] = self.counterfactual.mean("control")
        out["cf_directions"] = sum(s is not None for s in self.counterfactual.success)
        return out


def score_maps(comp: Components, X: Tensor, hw: tuple[int, int]) -> Tensor:
    """Per-direction score maps (N, K, h, w) of a method on activations X (N, P, D)."""
    return to_map(comp.score(X), hw)


def score_components(comp: Components, split: LayerSplit, X: Tensor, data: WorldData, concepts: ConceptSet,
                     cfg: LayerConfig, thresholds: Tensor, fit_X: Tensor, seed: int = 0,
                     pairs: Optional[DirectionPairs] = None) -> LayerReport:
    """Steps 3-5 for any method's components on evaluation activations X (N, P, D) of ``data``'s images.
    ``thresholds`` (K,): detection thresholds on ``comp.score``; ``fit_X``: the fitting activations (for
    the coordinate spreads)."""
    t0 = time.perf_counter()
    maps = score_maps(comp, X, split.hw)
    iou = dissect(maps, thresholds, data.masks)
    labels = label(iou, concepts.names, cfg.min_iou)
    sigma = coordinate_spread(fit_X, comp.S)
    alpha = float(sigma.median())
    flat = X.reshape(-1, X.shape[-1])
    positives = comp.score(flat) > thresholds
    n_tests = comp.S.shape[1] * len(split.classes())
    n_perm = cfg.n_perm or 2 * math.ceil(n_tests / cfg.level)
    n_inf = len(X) if cfg.influence_images is None else min(len(X), cfg.influence_images)
    # a saturated classifier's probabilities barely move; its logits do (influence_on="logits")
    f_out = split.f_plus if cfg.influence_on == "probabilities" else split.logits
    influence = {t: rcav_influence(comp, X[:n_inf], f_out, alpha=alpha, n_perm=n_perm, seed=seed,
                                   level=cfg.level, output="probs", positives=positives[: n_inf * X.shape[1]],
                                   test=t, shared_null=cfg.shared_null) for t in cfg.tests}
    classes = split.classes()
    cf = counterfactuals(split, X, comp.S, class_targets(labels.names, classes), cfg.cf_k * sigma,
                         n_random=cfg.n_random, seed=seed)
    return LayerReport(comp.name, comp.S, iou, labels, concepts.names, classes, influence, cf, alpha, pairs,
                       {"score": time.perf_counter() - t0})


def fit_directions(split: LayerSplit, fit_X: Tensor, cfg: LayerConfig, seed: int = 0,
                   callback: Optional[Callable] = None) -> DirectionPairs:
    """Step 2: EDDP's direction pairs on fitting activations (N, P, D), with f+ for L^uur / L^cur."""
    ecfg = cfg.eddp_config()
    if ecfg.f_plus_output != "probs":  # LayerSplit.f_plus returns per-head probabilities
        ecfg = EDDPConfig(**{**ecfg.__dict__, "f_plus_output": "probs"})
    return fit_eddp(fit_X, split.f_plus, cfg.n_directions, ecfg, seed=seed, callback=callback)


def explain_layer(split: LayerSplit, fit: WorldData, evaluate: WorldData, concepts: ConceptSet,
                  cfg: Optional[LayerConfig] = None, seed: int = 0, pairs: Optional[DirectionPairs] = None,
                  callback: Optional[Callable] = None) -> LayerReport:
    """The whole pipeline (module docstring): fit on ``fit`` images (their masks unused), label and test on
    ``evaluate`` images. ``pairs``: reuse already fitted direction pairs (skips step 2)."""
    cfg = cfg or LayerConfig()
    t0 = time.perf_counter()
    fit_X = split.activations(fit.images)
    X = split.activations(evaluate.images)
    t1 = time.perf_counter()
    if pairs is None:
        pairs = fit_directions(split, fit_X, cfg, seed, callback)
    t2 = time.perf_counter()
    rep = score_components(from_pairs(pairs), split, X, evaluate, concepts, cfg, torch.zeros(pairs.W.shape[1]),
                           fit_X, seed, pairs=pairs)
    rep.seconds.update({"activations": t1 - t0, "fit": t2 - t1})
    return rep
