"""DiffEx: explaining a classifier through hierarchical semantics with text-guided edits
(Kazimi, Allada, Yanardag, CVPR 2025; seed 003), and its scoring against an exact editor.

The steps of the released code (TahiraKazimi/DiffEx), each here:

1-2. Inputs and taxonomy. A score s(x) (here a classifier's probability of a target class) and a
   semantic hierarchy category -> level-1 item -> level-2 keywords. DiffEx asks a VLM for the
   categories and an LLM for the keywords; featinv reads it from YAML (``Hierarchy.from_yaml``) --
   the hand-written stand-in for the VLM/LLM (in the shapes world: factor -> family -> value).
3. Editor: LEDITS++ (``featinv.explain.ledits.LeditsEditor``), or any object with
   ``edit(prompts, seed) -> images`` over a fixed image set; ``featinv.explain.shapes_oracles.RendererEditor``
   is the exact oracle. A keyword is phrased for the editor by its category's template
   ("a {} shape"); a level-1 item is edited with all its keywords at once (one multi-concept LEDITS++
   edit), since the stand-in vocabulary has no word for a family ("warm").
4. Delta of a keyword = mean over images and ``seeds`` of s(edited) - s(original) (``EditScorer``).
5. Rank level-1 items by |Delta|, keep ``beam_size``, expand their keywords, score them.
6. Return the ``top_k`` keywords by |Delta| with their paths (``min_delta`` filter).

Scoring against the oracle (``compare``): Spearman between DiffEx's and the oracle's keyword Deltas,
recall in the top-k of the factors the classifier truly uses, whether the true parent stays in the
beam and the true child ranks first; ``edit_quality``: edit success and leakage read by a judge.
Plain PyTorch / numpy.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["Node", "Hierarchy", "EditScorer", "DiffExResult", "run_diffex", "edit_quality", "compare", "spearman"]


@dataclass(frozen=True)
class Node:
    """One semantic: its path (category, item[, keyword]) and the editor prompts that apply it."""

    path: tuple[str, ...]
    prompts: tuple[str, ...]
    children: tuple["Node", ...] = ()

    @property
    def keyword(self) -> str:
        return self.path[-1]

    @property
    def name(self) -> str:
        return "/".join(self.path)


@dataclass
class Hierarchy:
    """category -> level-1 item -> keywords (DiffEx step 2), as given by a YAML file::

        domain: shapes
        categories:
          color:
            template: "a {} shape"        # how a keyword is phrased for the editor
            items: {warm: [red, orange, yellow], cool: [green, blue, purple]}

    A keyword may also be ``{keyword: prompt}`` to phrase it outside the template.
    """

    domain: str
    level1: list[Node]

    @classmethod
    def from_dict(cls, spec: Mapping) -> "Hierarchy":
        if "categories" not in spec:
            raise ValueError("a hierarchy needs 'categories': {category: {template, items: {item: [keywords]}}}")
        level1 = []
        for cat, c in spec["categories"].items():
            template = c.get("template", "{}")
            for item, kws in c["items"].items():
                if not kws:
                    raise ValueError(f"hierarchy item {cat}/{item} has no keywords")
                pairs = [next(iter(k.items())) if isinstance(k, Mapping) else (k, template.format(k)) for k in kws]
                leaves = tuple(Node((cat, item, str(k)), (str(p),)) for k, p in pairs)
                level1.append(Node((cat, item), tuple(p for leaf in leaves for p in leaf.prompts), leaves))
        return cls(str(spec.get("domain", "")), level1)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Hierarchy":
        import yaml

        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    @property
    def leaves(self) -> list[Node]:
        return [leaf for item in self.level1 for leaf in item.children]

    def node(self, name: str) -> Node:
        for n in self.level1 + self.leaves:
            if n.name == name or (len(n.path) == 3 and n.keyword == name):
                return n
        raise KeyError(f"no semantic {name!r} in the hierarchy")


class EditScorer:
    """Delta of a semantic (step 4): mean over images and seeds of s(edit) - s(original), edits
    memoised per (prompts, seed) so beam search, the full keyword sweep and the edit-quality judge
    share them. An ``exact`` editor (the oracle) is deterministic and scores a level-1 item through
    its keywords: the keyword with the largest |Delta| (a family has no single exact edit)."""

    def __init__(self, editor, score: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                 seeds: Sequence[int] = (0, 1), edited: dict | None = None):
        self.editor, self.score = editor, score
        self.exact = bool(getattr(editor, "exact", False))
        self.seeds = [0] if self.exact else [int(s) for s in seeds]
        self.base = score(images).double()  # s(original) per image
        # (prompts, seed) -> edited images; pass one dict to several scorers (classifiers) of one editor
        self.edited: dict[tuple[tuple[str, ...], int], torch.Tensor] = {} if edited is None else edited
        self.per_image: dict[str, torch.Tensor] = {}  # node name -> (S, N) s(edit) - s(original)
        self.n_edits = 0

    def images(self, node: Node, seed: int) -> torch.Tensor:
        key = (node.prompts, seed)
        if key not in self.edited:
            self.edited[key] = (self.editor.edit(node.keyword, seed) if self.exact
                                else self.editor.edit(list(node.prompts), seed))
            self.n_edits += 1
        return self.edited[key]

    def delta(self, node: Node) -> float:
        if node.name not in self.per_image:
            if self.exact and node.children:
                best = max(node.children, key=lambda c: abs(self.delta(c)))
                self.per_image[node.name] = self.per_image[best.name]
            else:
                self.per_image[node.name] = torch.stack([self.score(self.images(node, s)).double() - self.base
                                                         for s in self.seeds])
        return float(self.per_image[node.name].mean())


@dataclass
class DiffExResult:
    """Level-1 Deltas, the beam, the scored keywords and the top-k (path, Delta) of one run."""

    base_score: float
    level1: dict[str, float]
    beam: list[str]
    leaves: dict[str, float]
    top: list[tuple[str, float]]
    beam_size: int
    top_k: int
    seeds: list[int]
    n_edits: int
    seconds: float
    all_leaves: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        r6 = lambda d: {k: round(v, 6) for k, v in d.items()}  # noqa: E731
        return {"base_score": round(self.base_score, 6), "level1": r6(self.level1), "beam": self.beam,
                "leaves": r6(self.leaves), "top": [[p, round(d, 6)] for p, d in self.top],
                "all_leaves": r6(self.all_leaves), "beam_size": self.beam_size, "top_k": self.top_k,
                "seeds": self.seeds, "n_edits": self.n_edits, "seconds": round(self.seconds, 2)}


def run_diffex(hierarchy: Hierarchy, scorer: EditScorer, *, beam_size: int = 3, top_k: int = 5,
               min_delta: float = 0.0, score_all_leaves: bool = False) -> DiffExResult:
    """DiffEx beam search (steps 4-6). ``score_all_leaves`` also scores the keywords outside the beam
    (``all_leaves``; for comparing every keyword with an oracle -- not part of DiffEx)."""
    if beam_size < 1 or top_k < 1:
        raise ValueError(f"beam_size and top_k must be >= 1, got {beam_size}, {top_k}")
    t0, n0 = time.time(), scorer.n_edits
    level1 = {n.name: scorer.delta(n) for n in hierarchy.level1}
    scored = [n for n in hierarchy.level1 if abs(level1[n.name]) >= min_delta]
    beam = sorted(scored, key=lambda n: -abs(level1[n.name]))[:beam_size]  # stable: ties keep YAML order
    leaves = {c.name: scorer.delta(c) for n in beam for c in n.children}
    kept = [(k, d) for k, d in leaves.items() if abs(d) >= min_delta]
    top = sorted(kept, key=lambda kd: -abs(kd[1]))[:top_k]
    all_leaves = {c.name: scorer.delta(c) for c in hierarchy.leaves} if score_all_leaves else {}
    return DiffExResult(base_score=float(scorer.base.mean()), level1=level1, beam=[n.name for n in beam],
                        leaves=leaves, top=top, beam_size=beam_size, top_k=top_k, seeds=scorer.seeds,
                        n_edits=scorer.n_edits - n0, seconds=time.time() - t0, all_leaves=all_leaves)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation, or None when either side is constant (undefined)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def compare(result: DiffExResult, oracle: DiffExResult, leaf_factor: Callable[[str], str],
            used_threshold: float = 0.05) -> dict:
    """Score DiffEx against the oracle's run on the same images and classifier.

    ``spearman``: over every keyword (both runs with ``score_all_leaves``), signed Deltas (and ``|.|``);
    ``used``: the factors (``leaf_factor(keyword)``) with an oracle keyword |Delta| >= ``used_threshold``;
    ``recall``: the share of them among the factors of DiffEx's top-k keywords; ``true_child``: the
    oracle's keyword with the largest |Delta|; ``parent_in_beam``: its level-1 item is in DiffEx's beam;
    ``child_first``: DiffEx's top keyword is it.
    """
    keys = sorted(oracle.all_leaves)
    if not keys or sorted(result.all_leaves) != keys:
        raise ValueError("compare needs both runs with score_all_leaves=True over the same hierarchy")
    d, o = [result.all_leaves[k] for k in keys], [oracle.all_leaves[k] for k in keys]
    used = sorted({leaf_factor(k) for k in keys if abs(oracle.all_leaves[k]) >= used_threshold})
    found = {leaf_factor(p) for p, _ in result.top}
    child = max(keys, key=lambda k: abs(oracle.all_leaves[k]))
    return {"spearman": spearman(d, o), "spearman_abs": spearman(np.abs(d), np.abs(o)), "used_factors": used,
            "top_factors": sorted(found), "recall": (len(set(used) & found) / len(used)) if used else None,
            "true_child": child, "true_parent": child.rsplit("/", 1)[0],
            "parent_in_beam": child.rsplit("/", 1)[0] in result.beam,
            "child_first": bool(result.top) and result.top[0][0] == child}


def edit_quality(scorer: EditScorer, originals: torch.Tensor, nodes: Sequence[Node],
                 read: Callable[[torch.Tensor], dict], leaf_value: Callable[[str], tuple[str, int]]) -> dict:
    """Edit success and leakage of the edits ``scorer`` made of ``originals``, as a judge reads them.

    For each leaf edit (factor f set to value v) of each image whose reading of f is not already v:
    success = the judge reads v on the edited image; leakage = the judge reads a change in any other
    factor. A level-1 node (a family of one factor's values) is judged the same way with v = any of its
    keywords' values. Returns overall rates, per-factor rates and counts, and per edited factor
    ``leaked_into``: the share of its edits that changed each other factor (which factor the leaks land in).
    """
    orig = read(originals)
    counts: dict[str, list[float]] = {}
    into: dict[str, dict[str, int]] = {}
    for node in nodes:
        fv = [leaf_value(c.keyword) for c in (node.children or (node,))]
        factor, values = fv[0][0], torch.tensor([v for _, v in fv], device=orig[fv[0][0]].device)
        if any(f != factor for f, _ in fv):
            raise ValueError(f"edit_quality: {node.name} mixes factors {sorted({f for f, _ in fv})}")
        need = ~torch.isin(orig[factor], values)
        for s in scorer.seeds:
            if (node.prompts, s) not in scorer.edited:
                continue
            got = read(scorer.edited[(node.prompts, s)])
            ok = torch.isin(got[factor], values)[need]
            leak = torch.zeros_like(need)
            hits = into.setdefault(factor, {})
            for f in got:
                if f != factor:
                    changed = got[f] != orig[f]
                    hits[f] = hits.get(f, 0) + int(changed[need].sum())
                    leak |= changed
            c = counts.setdefault(factor, [0, 0, 0])
            c[0] += int(need.sum())
            c[1] += int(ok.sum())
            c[2] += int(leak[need].sum())
    n = sum(c[0] for c in counts.values())
    if n == 0:
        raise ValueError("edit_quality: no edits to judge (score the nodes first)")
    return {"edits": n, "success": sum(c[1] for c in counts.values()) / n,
            "leakage": sum(c[2] for c in counts.values()) / n,
            "per_factor": {f: {"edits": c[0], "success": c[1] / max(c[0], 1), "leakage": c[2] / max(c[0], 1),
                               "leaked_into": {g: k / max(c[0], 1) for g, k in into[f].items()}}
                           for f, c in counts.items()}}
