"""``EDDPModule``: EDDP in the harness (``featinv predict -c configs/explain/eddp.yaml``).

The only EDDP file that imports Lightning (through ``featinv.harness``). A predict loop runs over
``DirectionTargets`` items - one (classifier, direction index) each. The first item of a classifier fits
EDDP's direction pairs at its layer on ``fit_split`` renders and analyses them on ``eval_split`` renders
(``featinv.explain.eddp_world.explain_layer``: Network-Dissection labels, S^1 / S^2, RCAV influence with
both nulls, counterfactuals); every item then validates its direction by activation maximisation with each
configured method (``featinv.explain.am``: guided diffusion on the empty-prompt prior and the AM baselines,
objective ``Projection``) and has the reader check the label in every image.

Output rules are inversion's (``featinv.harness``): one record per (dataset = classifier name, index =
direction, method, seed) with a fingerprint (prior, reader, classifier weights, EDDP configuration, the
direction), resume skips finished records (a classifier whose records are all done is not even fitted),
``samples/`` hold the AM images, ``grids/`` one gallery per direction (rows: the evaluation renders that
activate the direction most, then each method's AM images), W&B gets the per-classifier direction table
and the IoU heatmap. ``cache_dir`` keeps fitted direction pairs across runs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from featinv import results as R
from featinv.data import TargetSource
from featinv.explain import am as AM
from featinv.explain.eddp import PRESETS, DirectionPairs, EDDPConfig
from featinv.explain.eddp_world import LayerConfig, LayerReport, explain_layer
from featinv.harness import AnalysisModule
from featinv.methods import make_method, method_config
from featinv.results import digest, module_digest
from featinv.specs import build_encoder, build_prior
from featinv.viz import comparison_grid

__all__ = ["EDDPModule", "DirectionTargets"]


class DirectionTargets(TargetSource):
    """(classifier, direction) items: ``n_directions`` directions of ``classifier`` (an encoder spec of the
    world, e.g. ``zoo:shapes-shape``; ``?path=`` for other weights) at ``layer``."""

    def __init__(self, classifier: str, n_directions: int = 16, layer: str = "conv3", name: Optional[str] = None,
                 limit: Optional[int] = None):
        self.classifier, self.layer = classifier, layer
        self.name = name or classifier.split(":", 1)[-1].split("?")[0].split("@")[0]
        if not isinstance(n_directions, int) or n_directions < 1:
            raise ValueError(f"dataset {self.name!r}: n_directions={n_directions!r} must be an integer >= 1")
        self.n_directions = n_directions
        self.n = self._limit(n_directions, limit)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = self.item(i, label=i, text=self.classifier)
        item.update(layer=self.layer, n_directions=self.n_directions)
        return item


class EDDPModule(AnalysisModule):
    """EDDP + AM validation over ``DirectionTargets`` (see the module docstring).

    Args:
        prior: the unconditional prior for guided AM (``zoo:shapes-sd``: its empty prompt).
        reader: judge spec reading the AM images (``zoo:shapes-reader``).
        methods: AM methods (preset names or dicts); their objective becomes ``Projection`` unless set.
        eddp: an ``EDDPConfig`` preset name (``fast``) or a dict ``{preset: fast, <field>: value}``.
        world: ``shapes`` (concepts, renders and masks from ``featinv.explain.eddp_shapes``).
        fit_split / n_fit: unlabelled renders EDDP is fitted on; eval_split / n_eval: renders it is
            labelled and tested on.
        n_samples: AM images per direction and method; am_batch: images per AM call.
        cf_k: counterfactual step in coordinate spreads; shared_null, influence_images: ``LayerConfig``.
        gallery: evaluation renders shown per direction (the most activating ones).
        cache_dir: where fitted direction pairs are kept (None: in memory for this run only).
    """

    def __init__(self, prior: str | nn.Module = "zoo:shapes-sd", reader: str | Any = "zoo:shapes-reader",
                 methods: Optional[list] = None, eddp: str | dict = "fast", world: str = "shapes",
                 fit_split: str = "train", n_fit: int = 300, eval_split: str = "test", n_eval: int = 500,
                 n_samples: int = 4, am_batch: int = 32, cf_k: float = 2.0, shared_null: bool = True,
                 influence_images: Optional[int] = 256, gallery: int = 8, cache_dir: Optional[str] = None,
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=[k for k, v in (("prior", prior), ("reader", reader))
                                          if not isinstance(v, str)])
        if world != "shapes":
            raise ValueError(f"model.world must be 'shapes' (the only world with pixel-labelled concepts), got {world!r}")
        self.methods = [AM.with_projection(make_method(m)) for m in (methods or ["fast", "pixel", "fourier"])]
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}: give each a 'name'")
        self.eddp_cfg = _eddp_config(eddp)
        self.prior_spec = prior if isinstance(prior, str) else type(prior).__name__
        self.prior = build_prior(prior) if isinstance(prior, str) else prior
        self.reader = build_encoder(reader) if isinstance(reader, str) else reader
        self.world, self.seed = world, seed
        self.fit_split, self.n_fit, self.eval_split, self.n_eval = fit_split, n_fit, eval_split, n_eval
        self.n_samples, self.am_batch, self.gallery = n_samples, am_batch, gallery
        self.layer_cfg = dict(cf_k=cf_k, shared_null=shared_null, influence_images=influence_images)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._analyses: dict[tuple, tuple] = {}
        self._new_tables: Optional[tuple] = None  # set by ``analysis`` when it has just analysed a classifier

    # -- identity --------------------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"prior": self.prior_spec, "prior_weights": module_digest(self.prior),
                "reader": module_digest(self.reader) if isinstance(self.reader, nn.Module) else repr(self.reader),
                "eddp": dataclasses.asdict(self.eddp_cfg), "world": self.world, "fit": [self.fit_split, self.n_fit],
                "eval": [self.eval_split, self.n_eval], "layer_config": self.layer_cfg, "n_samples": self.n_samples,
                "seed": self.seed}

    def method_configs(self) -> dict[str, dict]:
        return {m.name: method_config(m) for m in self.methods}

    def target_hashes(self, batch: dict) -> list[str]:
        """A target is (classifier spec, its weights, layer, number of directions, direction)."""
        return [digest([spec, module_digest(self._split(spec, layer).encoder.model), layer, int(n), int(i)])
                for spec, layer, n, i in zip(batch["text"], batch["layer"], batch["n_directions"], batch["label"])]

    # -- analysis (once per classifier) ---------------------------------------------------------------
    def _split(self, spec: str, layer: str):
        key = ("split", spec, layer)
        if key not in self._analyses:
            from featinv.explain.eddp_shapes import layer_split

            self._analyses[key] = layer_split(spec, layer)
        return self._analyses[key]

    def analysis(self, spec: str, layer: str, n_directions: int) -> tuple[Any, LayerReport, torch.Tensor]:
        """(split, report, evaluation images) of a classifier; fitted once (or loaded from ``cache_dir``)."""
        key = (spec, layer, n_directions)
        if key not in self._analyses:
            from featinv.explain import eddp_shapes as ES

            split = self._split(spec, layer)
            cs = ES.concepts()
            fit, ev = ES.world_data(self.fit_split, self.n_fit, cs), ES.world_data(self.eval_split, self.n_eval, cs)
            cfg = LayerConfig(n_directions=n_directions, eddp=self.eddp_cfg, **self.layer_cfg)
            cache = self._cache_path(spec, layer, n_directions, split)
            pairs = DirectionPairs.from_state_dict(torch.load(cache)) if cache and cache.exists() else None
            with torch.enable_grad():
                rep = explain_layer(split, fit, ev, cs, cfg, seed=self.seed, pairs=pairs)
            if cache and pairs is None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save({k: v for k, v in rep.pairs.state_dict().items() if k != "history"}, cache)
            self._analyses[key] = (split, rep, ev.images)
            self._new_tables = key
        return self._analyses[key]

    def _cache_path(self, spec, layer, n, split) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"eddp-{digest([spec, module_digest(split.encoder.model), layer, n, self.identity()])}.pt"

    # -- the predict step -----------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        pred = {"records": [], "images": {}, "grids": {}, "tables": {}, "plots": {}}
        hashes = self.target_hashes(batch)
        todo: dict[tuple, dict[str, list[int]]] = {}
        for b in range(len(batch["index"])):
            spec, layer, n = batch["text"][b], batch["layer"][b], int(batch["n_directions"][b])
            for m in self.methods:
                key = (batch["dataset"][b], int(batch["index"][b]), m.name, self.seed)
                if not self.is_done(key, self.fingerprint(m.name, hashes[b])):
                    todo.setdefault((spec, layer, n), {}).setdefault(m.name, []).append(b)
        for (spec, layer, n), per_method in todo.items():
            self._new_tables = None
            split, rep, ev_images = self.analysis(spec, layer, n)
            if self._new_tables is not None:
                self._tables(batch["dataset"][per_method[next(iter(per_method))][0]], rep, pred)
            rows = {}
            for m in self.methods:
                items = per_method.get(m.name, [])
                if items:
                    rows[m.name] = self._validate(m, split, rep, batch, items, hashes, pred)
            self._galleries(batch, per_method, rep, split, ev_images, rows, pred)
        return pred

    def _validate(self, method, split, rep: LayerReport, batch, items, hashes, pred) -> dict:
        dataset = batch["dataset"][items[0]]
        dirs = [int(batch["label"][b]) for b in items]
        with torch.enable_grad():
            res = AM.maximise(method, self.prior, split.encoder.to(self.prior.device), rep.S, dirs, self.n_samples,
                              seed=self.seed, dataset=dataset, batch=self.am_batch)
        from featinv.explain.eddp_shapes import factors

        labels = [rep.labels.names[i] for i in dirs]
        out = AM.read(self.reader, res.images, labels, factors())
        table = {r["direction"]: r for r in rep.rows()}
        for j, b in enumerate(items):
            i, d = dirs[j], batch["dataset"][b]
            paths = [R.sample_path(d, int(batch["index"][b]), method.name, f"_{k}") for k in range(self.n_samples)]
            for k, p in enumerate(paths):
                pred["images"][p] = res.images[j, k]
            hit = out.hit[j]
            rec = {"dataset": d, "index": int(batch["index"][b]), "label": i, "method": method.name, "seed": self.seed,
                   "fingerprint": self.fingerprint(method.name, hashes[b]), "classifier": batch["text"][b],
                   "layer": batch["layer"][b], **{k: v for k, v in table[i].items() if k != "direction"},
                   "am_hit": None if torch.isnan(hit).all() else float(hit.mean()),
                   "am_on_manifold": float(out.on_manifold[j].mean()),
                   "am_projection": float(res.projection[j].mean()),
                   **{f"am_read_{f}": [int(v) for v in vals[j]] for f, vals in out.values.items()},
                   "nfe": res.nfe, "seconds": res.seconds / max(1, len(items) * self.n_samples),
                   "image": paths[0], "images": paths}
            pred["records"].append(rec)
        return {b: res.images[j] for j, b in enumerate(items)}

    def _galleries(self, batch, per_method, rep, split, ev_images, rows, pred) -> None:
        """One grid per direction: the most activating evaluation renders, then each method's AM images."""
        items = sorted({b for bs in per_method.values() for b in bs})
        X = split.activations(ev_images)
        proj = (X @ (rep.S / rep.S.norm(dim=0))).mean(1)            # (N, I) mean projection per image
        for b in items:
            i = int(batch["label"][b])
            top = ev_images[proj[:, i].argsort(descending=True)[: self.gallery]]
            grid_rows = [top] + [_pad(rows[m][b], self.gallery) for m in rows if b in rows[m]]
            d, idx = batch["dataset"][b], int(batch["index"][b])
            pred["grids"][f"{R.GRIDS}/{d}_{idx:06d}.png"] = comparison_grid(grid_rows)
        pred["grid_caption"] = "rows: most activating renders | " + " | ".join(rows)

    def _tables(self, dataset: str, rep: LayerReport, pred: dict) -> None:
        rows = rep.rows()
        cols = list(rows[0])
        pred["tables"][f"{dataset}/directions"] = (cols, [[r[c] for c in cols] for r in rows])
        summ = rep.summary()
        pred["tables"][f"{dataset}/summary"] = (list(summ), [[summ[k] for k in summ]])
        try:
            from featinv.explain.plots_eddp import iou_heatmap

            pred["plots"][f"{dataset}_iou"] = iou_heatmap(rep, dataset)
        except ImportError:  # matplotlib missing: tables only
            pass


def _pad(imgs: torch.Tensor, n: int) -> torch.Tensor:
    if len(imgs) >= n:
        return imgs[:n]
    return torch.cat([imgs, torch.ones(n - len(imgs), *imgs.shape[1:])])


def _eddp_config(spec) -> EDDPConfig:
    if isinstance(spec, EDDPConfig):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"model.eddp: unknown preset {spec!r}; presets: {sorted(PRESETS)}")
        return PRESETS[spec]
    spec = dict(spec)
    base = _eddp_config(spec.pop("preset", "fast"))
    known = {f.name for f in dataclasses.fields(EDDPConfig)}
    bad = sorted(set(spec) - known)
    if bad:
        raise ValueError(f"model.eddp: unknown option(s) {bad}; options: {sorted(known)}")
    return dataclasses.replace(base, **spec)
