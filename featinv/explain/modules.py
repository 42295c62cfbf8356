"""The explainers in the harness: ``DepictModule`` and ``DiffExModule`` (LightningModules run by
``featinv predict``), and ``ClassifierTargets``, the dataset they loop over -- the only module of
``featinv.explain`` that imports Lightning.

One predict item = one classifier to explain (``ClassifierTargets``: its name, for DiffEx with the
target class, ``"unbiased-color:red"``). Its records have the key (dataset, index, method, seed),
one per method: ``depict`` / ``oracle`` / ``gradcam`` for DEPICT, ``diffex`` / ``oracle`` for DiffEx; the
fingerprint hashes the module's configuration, the generator's / editor's weights and the
classifier's name and weights, so resume skips a classifier whose records are there. Generated
scenes (DEPICT) and edits (DiffEx) do not depend on the classifier: they are made at the first item
and reused for the others (``SceneCache``, a shared edit cache).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from featinv.data import TargetSource
from featinv.explain import shapes_oracles as SO
from featinv.explain.depict import CaptionGenerator, SceneCache, permuted_table, run_depict
from featinv.explain.diffex import EditScorer, Hierarchy, compare, edit_quality, run_diffex, spearman
from featinv.explain.gradcam import gradcam_concept_importance
from featinv.explain.plots import importance_boxplot, keyword_bars
from featinv.harness import AnalysisModule
from featinv.results import module_digest, tensor_digest
from featinv.specs import build_prior
from featinv.viz import comparison_grid

__all__ = ["ClassifierTargets", "DepictModule", "DiffExModule"]

ROOT = Path(__file__).resolve().parents[2]


def _folder_digest(folder: Path) -> str:
    """Hash of a model folder's weights and configs (names and bytes)."""
    import hashlib

    h = hashlib.blake2b(digest_size=10)
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".txt", ".bin"):
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


class ClassifierTargets(TargetSource):
    """The classifiers to explain, one item each (``text`` = the classifier, e.g. ``primary-red-circle``
    or, for DiffEx, ``unbiased-color:red``)."""

    def __init__(self, classifiers: list[str], name: str = "classifiers"):
        self.name, self.classifiers = name, [str(c) for c in classifiers]
        self._limit(len(self.classifiers), None)

    def __len__(self):
        return len(self.classifiers)

    def __getitem__(self, i):
        return self.item(i, text=self.classifiers[i])


class _Explainer(AnalysisModule):
    """What both explainers share: classifier lookup, per-item fingerprints, figure bookkeeping."""

    methods: tuple[str, ...]
    summary_fields: tuple[str, ...] = ()  # printed by `featinv predict` after the run

    def __init__(self, classifiers: dict | None):
        super().__init__()
        self._given = dict(classifiers or {})
        self._models: dict[str, nn.Module] = {}
        self._figs: list = []

    def classifier(self, name: str) -> nn.Module:
        if name not in self._models:
            self._models[name] = (self._given[name] if name in self._given else SO.target_classifier(name)).eval()
        return self._models[name]

    def todo(self, batch: dict, b: int, name: str) -> tuple[dict, list[str]]:
        h = tensor_digest(f"{name}\x00{module_digest(self.classifier(name))}")
        fps = {m: self.fingerprint(m, h) for m in self.methods}
        key = (batch["dataset"][b], int(batch["index"][b]))
        return fps, [m for m in self.methods if not self.is_done((*key, m, self.seed), fps[m])]

    def base(self, batch: dict, b: int, method: str, name: str, fp: str) -> dict:
        return {"dataset": batch["dataset"][b], "index": int(batch["index"][b]), "method": method,
                "seed": int(self.seed), "classifier": name, "fingerprint": fp}

    def on_predict_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        import matplotlib.pyplot as plt

        for fig in self._figs:  # written and logged by the callbacks, which run before this hook
            plt.close(fig)
        self._figs = []


class DepictModule(_Explainer):
    """DEPICT (``featinv.explain.depict``) of each classifier on the shapes world's multi-object scenes.

    Args:
        prior: the text-to-image prior (spec or ``Prior``), ``zoo:shapes-multi-sd`` by default.
        split, n_scenes: the scenes whose concept table is permuted (``world.load_split("multi", ...)``).
        permutations, steps, cfg_scale: P per concept, DDIM steps and CFG scale of the generator.
        concepts: concept names to permute (default all six).
        methods: ``depict`` (the diffusion model), ``oracle`` (the renderer), ``gradcam`` (Captum Grad-CAM
            at ``gradcam_layer`` pooled over the renderer's concept masks, on the real scenes).
        classifiers / labels / generator: Python objects instead of the zoo's target classifiers, their
            label functions (rows -> (N,) labels) and the prior (tests, custom worlds).
    """

    summary_fields = ("top1_hit", "spearman_oracle", "generation_gap_max", "off_diagonal_max")

    def __init__(self, prior: str | nn.Module | None = "zoo:shapes-multi-sd", split: str = "test",
                 n_scenes: int = 200, permutations: int = 5, steps: int = 25, cfg_scale: float = 3.0,
                 concepts: list[str] | None = None, methods: list[str] | None = None, gradcam_layer: str = "conv3",
                 seed: int = 0, batch: int = 64, examples: int = 8, classifiers: dict | None = None,
                 labels: dict | None = None, generator=None):
        super().__init__(classifiers)
        self.save_hyperparameters(ignore=["classifiers", "labels", "generator"] + ([] if isinstance(prior, str) or
                                                                                  prior is None else ["prior"]))
        from featinv.zoo.shapes import world as W

        self.methods = tuple(methods or ("depict", "oracle", "gradcam"))
        bad = set(self.methods) - {"depict", "oracle", "gradcam"}
        if bad or not self.methods:
            raise ValueError(f"DepictModule methods must be among depict, oracle, gradcam; got {sorted(bad)}")
        self.images, self.rows = W.load_split("multi", split, n_scenes)
        self.presence = self.rows["present"].copy()
        self.concept_ids = [SO.CONCEPTS.index(c) for c in (concepts or SO.CONCEPTS)]
        self.prior = build_prior(prior) if prior is not None else None
        if generator is None and self.prior is None and "depict" in self.methods:
            raise ValueError("DepictModule needs a prior (or a generator) to run 'depict'")
        self.generator = generator or (CaptionGenerator(self.prior, SO.multi_caption, seed=seed, steps=steps,
                                                        cfg_scale=cfg_scale, batch=batch) if self.prior else None)
        self.detector = SO.presence_detector()
        self.labels = dict(labels or {})
        self.seed, self.batch, self.examples = int(seed), int(batch), int(examples)
        self.cfg = dict(split=split, n_scenes=n_scenes, permutations=permutations, concepts=concepts or SO.CONCEPTS)
        self.gen_cfg = dict(steps=steps, cfg_scale=cfg_scale, prior=prior if isinstance(prior, str) else None)
        self.gradcam_layer = gradcam_layer
        self._gen = SceneCache(self.generator) if self.generator else None
        self._oracle = SceneCache(SO.RendererOracle(self.rows))

    def identity(self) -> dict:
        gen = self.prior if self.prior is not None else self.generator
        return {"explainer": "depict", "seed": self.seed, "detector": module_digest(self.detector),
                "generator": module_digest(gen) if isinstance(gen, nn.Module) else type(gen).__name__, **self.cfg}

    def method_configs(self) -> dict[str, dict]:
        return {"depict": {**self.gen_cfg, **self.cfg}, "oracle": {"renderer": "world.permute+render", **self.cfg},
                "gradcam": {"layer": self.gradcam_layer, "target": "pred", "pool": "mask share"}}

    def _labels(self, name: str) -> np.ndarray:
        return np.asarray(self.labels[name](self.rows) if name in self.labels else SO.target_labels(name, self.rows))

    def _run(self, cache, name):
        clf = self.classifier(name)
        return run_depict(self.presence, {name: self._labels(name)}, {name: clf}, None, cache=cache,
                          concept_names=SO.CONCEPTS, concepts=self.concept_ids, detector=self.detector,
                          real_images=self.images, permutations=self.cfg["permutations"], seed=self.seed,
                          batch=self.batch, progress=lambda m: print(m, flush=True) if self.global_rank == 0 else None)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        pred = {"records": [], "grids": {}, "tables": {}, "plots": {}}
        for b, name in enumerate(batch["text"]):
            fps, todo = self.todo(batch, b, name)
            if not todo:
                continue
            res = {"oracle": self._run(self._oracle, name)}
            if "depict" in todo:
                res["depict"] = self._run(self._gen, name)
            imp = {m: r.importance[name] for m, r in res.items()}
            if "gradcam" in todo:
                masks = SO.concept_masks(self.rows)[:, self.concept_ids]
                imp["gradcam"] = gradcam_concept_importance(self.classifier(name), self.gradcam_layer, self.images,
                                                            masks, batch=self.batch)
            truth = self._truth(name)
            concepts = res["oracle"].concepts
            for m in todo:
                rank = [concepts[k] for k in np.argsort(-imp[m], kind="stable")]
                rec = {**self.base(batch, b, m, name, fps[m]), "ranking": rank, "top": rank[0],
                       "importance": dict(zip(concepts, imp[m].round(6).tolist())),
                       "spearman_oracle": spearman(imp[m], imp["oracle"]), "truth": truth,
                       "top_agrees_oracle": int(rank[0] == res["oracle"].ranking(name)[0])}
                if truth.get("concept") is not None:
                    rec["top1_hit"] = int(rank[0] == truth["concept"])
                if m in res:
                    r = res[m].to_dict()
                    rec.update(metric=r["metric"][name], real=r["real"][name], generated=r["generated"][name],
                               permuted=dict(zip(concepts, r["permuted"][name])), independence=r["independence"],
                               detector_real=r["detector_real"], detector_generated=r["detector_generated"],
                               generation_gap_max=max(r["generation_gap"]), off_diagonal_max=r["off_diagonal"],
                               images_generated=r["images_generated"], seconds=r["seconds"])
                pred["records"].append(rec)
            fig = importance_boxplot(concepts, {m: r.deltas(name) for m, r in res.items()}, title=f"DEPICT: {name}",
                                     extra={"grad-cam share": imp["gradcam"]} if "gradcam" in imp else None)
            self._figs.append(fig)
            pred["plots"][f"depict/{name}"] = fig
            pred["tables"][f"depict/{name}"] = (["concept"] + list(imp), [
                [c] + [round(float(imp[m][k]), 4) for m in imp] for k, c in enumerate(concepts)])
            pred["grids"][f"grids/{batch['dataset'][b]}_{int(batch['index'][b]):06d}.png"] = self._grid(res, name)
        pred["grid_caption"] = "rows: real | generated | top concept permuted (generated) | same (renderer)"
        return pred

    def _truth(self, name: str) -> dict:
        if name in self._given:
            return {}
        try:
            return SO.target_truth(name)
        except (FileNotFoundError, KeyError):
            return {}

    def _grid(self, res: dict, name: str) -> torch.Tensor:
        k = min(self.examples, len(self.rows))
        scenes, rows = np.arange(k), [self.images[:k]]
        top = SO.CONCEPTS.index((res.get("depict") or res["oracle"]).ranking(name)[0])
        table = permuted_table(self.presence, top, 0, self.seed)[:k]
        if "depict" in res:  # generated scenes, then the same with the top concept permuted
            rows += [self._gen(self.presence[:k], scenes), self._gen(table, scenes)]
        return comparison_grid(rows + [self._oracle(table, scenes)])


class DiffExModule(_Explainer):
    """DiffEx (``featinv.explain.diffex``) of each classifier's target class on single-object scenes.

    Args:
        sd: the Stable-Diffusion-layout folder LEDITS++ edits with (a zoo name, ``shapes-sd``, or a path).
        hierarchy: the YAML semantic hierarchy (the stand-in for DiffEx's VLM/LLM).
        split, n_images: the scenes edited (``world.load_split("single", ...)``); ``seeds``: the seeded edits
            averaged per keyword; ``beam_size``, ``top_k``: the beam search.
        steps, skip, edit_guidance_scale, edit_threshold, scheduler: LEDITS++ (chosen on the val split,
            benchmarks/diffex.py); ``context``: in-context edits (the scenes captioned by the reader, each keyword
            put into the caption; ``featinv.explain.ledits``); ``combine``: a family's keywords as one edit,
            their guidance summed (LEDITS++) or averaged (``LeditsEditor``).
        score_all_leaves: also score keywords outside the beam (needed for the oracle Spearman).
        used_threshold: oracle |Delta| above which a factor counts as used by the classifier.
        methods: ``diffex`` (LEDITS++) and ``oracle`` (renderer edits).
        classifiers / editor: Python objects instead of the zoo's classifiers and the LEDITS++ editor.
    """

    summary_fields = ("spearman", "recall", "parent_in_beam", "child_first", "edit_success", "edit_leakage")

    def __init__(self, sd: str = "shapes-sd", hierarchy: str = "configs/explain/hierarchy_shapes.yaml",
                 split: str = "test", n_images: int = 24, seeds: list[int] | None = None, beam_size: int = 3,
                 top_k: int = 5, steps: int = 20, skip: float = 0.1, edit_guidance_scale: float = 10.0,
                 edit_threshold: float = 0.75, context: bool = False, combine: str = "sum",
                 scheduler: str = "dpmsolver++", score_all_leaves: bool = True,
                 used_threshold: float = 0.05, methods: list[str] | None = None, seed: int = 0, batch: int = 64,
                 examples: int = 6, classifiers: dict | None = None, editor=None):
        super().__init__(classifiers)
        self.save_hyperparameters(ignore=["classifiers", "editor"])
        from featinv.zoo.shapes import world as W

        self.methods = tuple(methods or ("diffex", "oracle"))
        if set(self.methods) - {"diffex", "oracle"} or not self.methods:
            raise ValueError(f"DiffExModule methods must be among diffex, oracle; got {list(self.methods)}")
        path = Path(hierarchy)
        self.hierarchy = Hierarchy.from_yaml(path if path.is_absolute() or path.exists() else ROOT / path)
        self.images, self.rows = W.load_split("single", split, n_images)
        self.seeds = [int(s) for s in (seeds if seeds is not None else [0, 1])]
        self.seed, self.batch, self.examples = int(seed), int(batch), int(examples)
        self.search = dict(beam_size=beam_size, top_k=top_k, score_all_leaves=score_all_leaves)
        if combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")
        self.ledits = dict(steps=steps, skip=skip, edit_guidance_scale=edit_guidance_scale,
                           edit_threshold=edit_threshold, combine=combine)
        self.context = bool(context)
        if self.context:  # every prompt must go into a caption, or the run would stop at its first edit
            bad = sorted({p for n in self.hierarchy.leaves for p in n.prompts} - set(SO.partial_captions()))
            if bad:
                raise ValueError(f"DiffExModule(context=True) puts each prompt into a scene's caption, and "
                                 f"{bad[:3]} are not one-factor phrases of the shapes grammar; use context=False")
        self.sd, self.scheduler, self.used_threshold = sd, scheduler, float(used_threshold)
        self.editor, self.oracle = editor, SO.RendererEditor(self.rows)
        self.reader = SO.factor_reader()
        self._edits: dict = {}
        self._oracle_edits: dict = {}

    def _sd_dir(self) -> Path:
        from featinv.zoo.shapes import shapes_sd_dir

        return Path(self.sd) if Path(self.sd).is_dir() else shapes_sd_dir(self.sd)

    def identity(self) -> dict:
        ed = {"sd": str(self.sd)}
        if self.editor is None and "diffex" in self.methods:
            ed["sd_weights"] = _folder_digest(self._sd_dir())
        return {"explainer": "diffex", "seed": self.seed, "reader": module_digest(self.reader),
                "split": self.hparams.split, "n_images": len(self.rows), "hierarchy": [n.name for n in
                                                                                     self.hierarchy.leaves], **ed}

    def method_configs(self) -> dict[str, dict]:
        return {"diffex": {**self.search, **self.ledits, "context": self.context, "scheduler": self.scheduler,
                           "seeds": self.seeds},
                "oracle": {**self.search, "editor": "world.edit+render"}}

    def on_predict_start(self) -> None:
        super().on_predict_start()
        if self.editor is None and "diffex" in self.methods:
            from featinv.explain.ledits import LeditsEditor, load_ledits_pipeline

            pipe = load_ledits_pipeline(self._sd_dir(), scheduler=self.scheduler)
            ctx = SO.context_edits(self.images, self.reader) if self.context else {}
            self.editor = LeditsEditor(pipe, self.images, batch=self.batch, **self.ledits, **ctx)

    def _score_fn(self, name: str):
        from featinv.zoo.shapes import targets
        from featinv.zoo.shapes import world as W

        model, cls = name.rsplit(":", 1) if ":" in name else (name, "0")
        if not cls.lstrip("-").isdigit():
            factor = targets.BIASED[model].label if model in targets.BIASED else targets.UNBIASED[model]
            cls = W.FACTORS[factor].index(cls)
        clf, k = self.classifier(model), int(cls)
        return lambda x: torch.cat([clf(x[i:i + 256].float()).softmax(1)[:, k] for i in range(0, len(x), 256)])

    def classifier(self, name: str) -> nn.Module:
        return super().classifier(name.rsplit(":", 1)[0])

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        pred = {"records": [], "grids": {}, "tables": {}, "plots": {}}
        for b, name in enumerate(batch["text"]):
            fps, todo = self.todo(batch, b, name)
            if not todo:
                continue
            score = self._score_fn(name)
            scorers = {"oracle": EditScorer(self.oracle, score, self.images, edited=self._oracle_edits)}
            if "diffex" in todo:
                scorers["diffex"] = EditScorer(self.editor, score, self.images, self.seeds, edited=self._edits)
            res = {m: run_diffex(self.hierarchy, s, **self.search) for m, s in scorers.items()}
            quality = (edit_quality(scorers["diffex"], self.images, self.hierarchy.leaves, self.reader,
                                    SO.keyword_factor) if "diffex" in res else None)
            for m in todo:
                rec = {**self.base(batch, b, m, name, fps[m]), **res[m].to_dict(), "truth": self._truth(name),
                       "top_keyword": res[m].top[0][0] if res[m].top else None}
                if self.search["score_all_leaves"]:
                    c = compare(res[m], res["oracle"], lambda k: SO.keyword_factor(k.rsplit("/", 1)[-1])[0],
                                self.used_threshold)
                    rec.update({k: (int(v) if isinstance(v, bool) else v) for k, v in c.items()})
                if m == "diffex":
                    rec.update(edit_success=quality["success"], edit_leakage=quality["leakage"],
                               edit_quality=quality["per_factor"], edits=quality["edits"])
                pred["records"].append(rec)
            if self.search["score_all_leaves"]:
                fig = keyword_bars({m: r.all_leaves for m, r in res.items()}, title=f"DiffEx: {name}")
                self._figs.append(fig)
                pred["plots"][f"diffex/{name}"] = fig
                keys = sorted(res["oracle"].all_leaves)
                pred["tables"][f"diffex/{name}"] = (["keyword"] + list(res), [
                    [k] + [round(res[m].all_leaves[k], 4) for m in res] for k in keys])
            pred["grids"][f"grids/{batch['dataset'][b]}_{int(batch['index'][b]):06d}.png"] = self._grid(res, scorers)
        pred["grid_caption"] = "rows: original, then each top-k keyword's edit (seed 0; DiffEx, else the oracle)"
        return pred

    def _truth(self, name: str) -> dict:
        try:
            return {} if name.rsplit(":", 1)[0] in self._given else SO.target_truth(name.rsplit(":", 1)[0])
        except (FileNotFoundError, KeyError):
            return {}

    def _grid(self, res: dict, scorers: dict) -> torch.Tensor:
        m = "diffex" if "diffex" in res else "oracle"
        k, rows = min(self.examples, len(self.images)), [self.images[:self.examples]]
        for path, _ in res[m].top:
            rows.append(scorers[m].images(self.hierarchy.node(path), scorers[m].seeds[0])[:k])
        return comparison_grid(rows)
