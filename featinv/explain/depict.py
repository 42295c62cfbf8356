"""DEPICT: Diffusion-Enabled Permutation Importance for image Classification Tasks
(Jabbour et al., ECCV 2024; seed 004), and its validity checks.

Permutation importance moved from a table to images: a dataset's concept table (which concept each
scene shows) is turned into captions, a text-conditioned generator renders them, and a concept's
importance for a classifier is how much the classifier's performance changes when that concept's
column is shuffled across scenes before generating. The steps, as numbered in the paper's method:

1. Generate every scene from its own caption with its own fixed seed (``CaptionGenerator``: DDIM with
   classifier-free guidance on a featinv ``Prior``); metric of the target classifier g on the
   generated set (AUROC of P(class 1) for a binary g, accuracy otherwise) and on the real images.
2. For each concept j and permutation p: shuffle column j across scenes (prevalence preserved,
   ``permuted_table``), rebuild the captions, regenerate -- *only the scenes whose caption changed*:
   with a per-scene seed an unchanged caption gives the identical image, and a changed scene only
   ever flips concept j, so ``SceneCache`` generates each (scene, table row) once over all p --
   and recompute the metric.
3. Importance_j = mean_p |metric(generated) - metric(permuted j, p)|; the per-permutation values
   are kept (box plots of the spread).
4. Validity checks, reported with every run: *effective generation* (a concept detector's AUROC per
   concept on real vs generated scenes, and g's metric on both) and *independent permutation*
   (the concept x concept matrix of the detector's |delta AUROC| for concept j' when j is permuted;
   near-diagonal when the generator changes only what the caption changed).

The table may also hold categorical factors (integer columns, e.g. a scene's colour and background):
a permutation shuffles a factor's values, and the detector's validity metric is then its accuracy per
factor instead of its AUROC per concept (``detector_scores``).

The generator is anything with the ``SceneGenerator`` protocol (table rows, scene ids -> images):
the diffusion model, or an ``Oracle`` such as the shapes world's renderer (``featinv.explain.shapes_oracles``),
which runs the very same protocol on exact counterfactuals. Plain PyTorch / numpy.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from featinv.api import target_seed
from featinv.contract import make_generators, randn
from featinv.guidance import ddim_step

__all__ = ["SceneGenerator", "Oracle", "SceneCache", "CaptionGenerator", "sample_prompts", "permuted_table",
           "auroc", "classifier_metric", "detector_scores", "DepictResult", "run_depict"]


class SceneGenerator(Protocol):
    """``gen(table (n, C), scenes (n,) int) -> images (n, 3, H, W) in [0, 1]``: scene ``scenes[i]`` showing
    the concepts (bool) or factor values (int) of ``table[i]``. It must be a function of (scene, row) only."""

    def __call__(self, presence: np.ndarray, scenes: np.ndarray) -> torch.Tensor: ...


Oracle = SceneGenerator  # an exact generator (the shapes renderer) has the same protocol


class SceneCache:
    """Memoises a ``SceneGenerator`` on (scene, presence row) and counts what it was asked for and
    what it generated (DEPICT step 2: only changed captions are regenerated, each once)."""

    def __init__(self, generator: SceneGenerator):
        self.generator, self.images = generator, {}
        self.requested = self.generated = self.calls = 0

    def __call__(self, presence: np.ndarray, scenes: np.ndarray) -> torch.Tensor:
        presence, scenes = np.asarray(presence), np.asarray(scenes, dtype=np.int64)
        keys = [(int(s), presence[i].tobytes()) for i, s in enumerate(scenes)]
        self.requested += len(keys)
        todo = list(dict.fromkeys(k for k in keys if k not in self.images))
        if todo:
            pos = [keys.index(k) for k in todo]
            out = self.generator(presence[pos], scenes[pos]).detach().float().cpu()
            if out.shape[0] != len(pos):
                raise ValueError(f"generator returned {out.shape[0]} images for {len(pos)} scenes")
            self.images.update(zip(todo, out))
            self.generated += len(todo)
            self.calls += 1
        return torch.stack([self.images[k] for k in keys])


@torch.no_grad()
def sample_prompts(prior, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, batch: int = 64,
                   eta: float = 0.0) -> torch.Tensor:
    """Text-to-image samples (n, C, H, W) in [0, 1]: DDIM (Song et al. 2021, eta 0) over ``steps`` of the
    prior's sampling timesteps, conditioned on each prompt, with the prior's classifier-free guidance
    (``prior.cfg_scale``, Ho & Salimans 2022); one generator per image, so an image depends only on
    its prompt and its seed, never on its batch companions."""
    acp = prior.alphas_cumprod.double().cpu()
    ts = prior.sampling_timesteps(steps)
    alphas = [float(acp[t]) for t in ts] + [1.0]
    out = []
    for i in range(0, len(prompts), batch):
        gens = make_generators(seeds[i:i + batch])
        cond = prior.encode_prompt(list(prompts[i:i + batch]))
        z = randn(gens, prior.latent_shape, device=prior.device)
        for k, t in enumerate(ts):
            eps = prior.eps(z, t, cond)
            noise = randn(gens, prior.latent_shape, device=prior.device) if eta > 0 else None
            z = ddim_step(z, eps, alphas[k], alphas[k + 1], eta, noise, prior.x0_range)
        out.append(prior.decode(z, clamp="hard").float().cpu())
    return torch.cat(out)


class CaptionGenerator:
    """DEPICT's generator (step 1): caption each table row (``caption_fn``), sample it with seed
    ``target_seed(seed, "depict", scene)`` (``sample_prompts``). ``cfg_scale`` (if given) sets the
    prior's classifier-free guidance scale."""

    def __init__(self, prior, caption_fn: Callable[[np.ndarray], str], seed: int = 0, steps: int = 25,
                 cfg_scale: float | None = None, batch: int = 64):
        self.prior, self.caption_fn, self.seed, self.steps, self.batch = prior, caption_fn, seed, steps, batch
        if cfg_scale is not None:
            if cfg_scale != 1.0 and getattr(prior, "uncond", None) is None:
                raise ValueError("cfg_scale needs a text-conditioned prior with a negative-prompt embedding")
            prior.cfg_scale = float(cfg_scale)

    def scene_seed(self, scene: int) -> int:
        return target_seed(self.seed, "depict", int(scene))

    def __call__(self, presence: np.ndarray, scenes: np.ndarray) -> torch.Tensor:
        prompts = [self.caption_fn(row) for row in np.asarray(presence)]
        return sample_prompts(self.prior, prompts, [self.scene_seed(s) for s in scenes], self.steps, self.batch)


def permuted_table(presence: np.ndarray, concept: int, p: int, seed: int = 0) -> np.ndarray:
    """Step 2: the table with column ``concept`` shuffled across rows (permutation ``p``, drawn from
    SeedSequence([seed, concept, p]): a concept's permutations do not depend on which others run)."""
    presence = np.asarray(presence)
    perm = np.random.default_rng([seed, concept, p]).permutation(len(presence))
    out = presence.copy()
    out[:, concept] = presence[perm, concept]
    return out


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (both classes must occur)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        raise ValueError("AUROC needs both classes among the labels")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def classifier_metric(probs: torch.Tensor, labels: np.ndarray) -> float:
    """g's metric: AUROC of P(class 1) for two classes, accuracy of the arg-max otherwise."""
    probs = probs.double()
    if probs.shape[1] == 2:
        return auroc(probs[:, 1].numpy(), labels)
    return float((probs.argmax(1).numpy() == np.asarray(labels)).mean())


@dataclass
class DepictResult:
    """Everything one DEPICT run measured (per classifier: metric on real / generated / permuted sets,
    importance; the detector's validity checks; generation counts). Arrays are (C,) or (C, P)."""

    concepts: list[str]
    classifiers: list[str]
    metric: dict[str, str]
    real: dict[str, float | None]
    generated: dict[str, float]
    permuted: dict[str, np.ndarray]
    detector_real: np.ndarray | None
    detector_generated: np.ndarray | None
    independence: np.ndarray | None
    n_scenes: int
    permutations: int
    seed: int
    images_requested: int
    images_generated: int
    seconds: float
    concept_index: list[int] = field(default_factory=list)

    @property
    def importance(self) -> dict[str, np.ndarray]:
        """Step 3: mean over permutations of |metric(generated) - metric(permuted)| per concept."""
        return {n: np.abs(self.generated[n] - self.permuted[n]).mean(1) for n in self.classifiers}

    def deltas(self, name: str) -> np.ndarray:
        """(C, P) |metric(generated) - metric(permuted)|: the spread behind each importance."""
        return np.abs(self.generated[name] - self.permuted[name])

    def ranking(self, name: str) -> list[str]:
        imp = self.importance[name]
        return [self.concepts[k] for k in np.argsort(-imp, kind="stable")]

    @property
    def generation_gap(self) -> np.ndarray | None:
        """|detector AUROC real - generated| per concept (effective generation)."""
        if self.detector_real is None or self.detector_generated is None:
            return None
        return np.abs(self.detector_real - self.detector_generated)

    @property
    def off_diagonal(self) -> float | None:
        """Largest off-diagonal entry of the independent-permutation matrix."""
        if self.independence is None or len(self.concepts) < 2:
            return None
        m = self.independence.copy()
        for r, k in enumerate(self.concept_index):
            m[r, k] = np.nan
        return float(np.nanmax(m))

    def to_dict(self) -> dict:
        def arr(a):
            return None if a is None else np.round(np.asarray(a, dtype=float), 6).tolist()

        return {"concepts": self.concepts, "metric": self.metric, "real": self.real, "generated": self.generated,
                "permuted": {k: arr(v) for k, v in self.permuted.items()},
                "importance": {k: arr(v) for k, v in self.importance.items()},
                "ranking": {k: self.ranking(k) for k in self.classifiers},
                "detector_real": arr(self.detector_real), "detector_generated": arr(self.detector_generated),
                "generation_gap": arr(self.generation_gap), "independence": arr(self.independence),
                "off_diagonal": self.off_diagonal, "n_scenes": self.n_scenes, "permutations": self.permutations,
                "seed": self.seed, "images_requested": self.images_requested,
                "images_generated": self.images_generated, "seconds": round(self.seconds, 2)}


@torch.no_grad()
def _probs(model: Callable, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]).float().softmax(1).cpu() for i in range(0, len(images), batch)])


@torch.no_grad()
def _detect(detector: Callable, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([detector(images[i:i + batch]).float().cpu() for i in range(0, len(images), batch)])


def _det_aurocs(out: torch.Tensor, table: np.ndarray, cols: Sequence[int]) -> np.ndarray:
    if table.dtype == bool:  # concept probabilities vs presence
        return np.array([auroc(out[:, k].numpy(), table[:, k]) for k in cols])
    return np.array([float((out[:, k].numpy() == table[:, k]).mean()) for k in cols])  # read values vs factors


def detector_scores(detector: Callable, images: torch.Tensor, table: np.ndarray, batch: int = 256) -> np.ndarray:
    """(C,) the detector's validity metric per column of ``table`` on ``images``: AUROC of its concept
    probabilities for a bool table, accuracy of the factor values it reads for an integer table."""
    table = np.asarray(table)
    return _det_aurocs(_detect(detector, images, batch), table, range(table.shape[1]))


def run_depict(presence: np.ndarray, labels: Mapping[str, np.ndarray], classifiers: Mapping[str, Callable],
               generator: SceneGenerator, *, concept_names: Sequence[str], concepts: Sequence[int] | None = None,
               detector: Callable | None = None, real_images: torch.Tensor | None = None, permutations: int = 5,
               seed: int = 0, batch: int = 256, cache: SceneCache | None = None,
               progress: Callable[[str], None] | None = None) -> DepictResult:
    """DEPICT (steps 1-4 of the module docstring) for several classifiers on one concept table.

    Args:
        presence: (N, C) table of the scenes (the real images' annotations): bool concept presence, or
            integer factor values (then the detector reads values and is scored by accuracy).
        labels: classifier name -> (N,) int outcome labels of the real scenes (kept fixed under permutation).
        classifiers: name -> model mapping images to logits (N, K); K = 2 is scored by AUROC.
        generator: a ``SceneGenerator`` (the diffusion model, or an oracle); wrapped in ``SceneCache``
            unless ``cache`` (a ``SceneCache`` shared with another run, e.g. over more concepts) is given.
        concept_names: the C concept names; ``concepts``: indices to permute (default all).
        detector: images -> (N, C) concept probabilities (or read factor values), for the validity
            checks (optional).
        real_images: the real scenes, for g's and the detector's real-vs-generated comparison (optional).
        permutations: P per concept (the paper: 25).
    """
    t0 = time.time()
    presence = np.asarray(presence)
    n, c = presence.shape
    if len(concept_names) != c:
        raise ValueError(f"{len(concept_names)} concept names for a table of {c} concepts")
    concepts = list(range(c)) if concepts is None else [int(k) for k in concepts]
    names = list(classifiers)
    for name in names:
        if len(np.asarray(labels[name])) != n:
            raise ValueError(f"labels of {name!r} have {len(np.asarray(labels[name]))} rows, the table {n}")
    if detector is not None and presence.dtype == bool:
        bad = [concept_names[k] for k in range(c) if presence[:, k].all() or not presence[:, k].any()]
        if bad:
            raise ValueError(f"the detector's AUROC needs each concept present and absent in some scene: {bad}")
    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    cache = cache if cache is not None else SceneCache(generator)
    req0, gen0 = cache.requested, cache.generated
    scenes = np.arange(n)
    say = progress or (lambda msg: None)

    def score(images):
        probs = {m: _probs(classifiers[m], images, batch) for m in names}
        return probs, (_detect(detector, images, batch) if detector is not None else None)

    metric = {}
    real = {m: None for m in names}
    det_real = None
    if real_images is not None:
        probs, det = score(real_images)
        real = {m: classifier_metric(probs[m], labels[m]) for m in names}
        det_real = _det_aurocs(det, presence, range(c)) if det is not None else None
    base = cache(presence, scenes)  # step 1
    probs, det_base = score(base)
    for m in names:
        metric[m] = "auroc" if probs[m].shape[1] == 2 else "accuracy"
    generated = {m: classifier_metric(probs[m], labels[m]) for m in names}
    det_gen = _det_aurocs(det_base, presence, range(c)) if det_base is not None else None
    say(f"depict: {n} scenes generated; metric {generated}")
    permuted = {m: np.zeros((len(concepts), permutations)) for m in names}
    indep = np.zeros((len(concepts), c)) if det_base is not None else None
    for r, j in enumerate(concepts):  # step 2
        for p in range(permutations):
            table = permuted_table(presence, j, p, seed)
            changed = np.nonzero(table[:, j] != presence[:, j])[0]
            images = base.clone()
            if len(changed):
                images[changed] = cache(table[changed], changed)
            probs, det = score(images)
            for m in names:
                permuted[m][r, p] = classifier_metric(probs[m], labels[m])
            if det is not None:  # step 4: against the *unpermuted* table
                indep[r] += np.abs(det_gen - _det_aurocs(det, presence, range(c))) / permutations
        say(f"depict: concept {concept_names[j]!r} done ({cache.generated - gen0} images generated so far)")
    return DepictResult(concepts=[concept_names[k] for k in concepts], classifiers=names, metric=metric, real=real,
                        generated=generated, permuted=permuted, detector_real=det_real, detector_generated=det_gen,
                        independence=indep, n_scenes=n, permutations=permutations, seed=seed,
                        images_requested=cache.requested - req0, images_generated=cache.generated - gen0,
                        seconds=time.time() - t0, concept_index=concepts)
