"""``DexterModule``: DEXTER / DiffExplainer in the harness (``featinv predict -c configs/explain/dexter.yaml``).

The only file of ``featinv.explain`` that imports Lightning. A predict loop runs over ``ClassTargets``
items - one (target classifier, class) each - and for each runs DEXTER (``mode: dexter``,
``featinv.explain.dexter``) or DiffExplainer (``mode: diffexplainer``, ``featinv.explain.diffexplainer``),
scores the final prompt (activation score), reads the frames with the reader and reports
(``featinv.explain.reporter``). Output rules are inversion's (``featinv.harness``): one record per
(dataset, index, method, seed) with a fingerprint (the prior, masked LM, reader and classifier weights,
the configuration and the (classifier, class) target), resume skips finished items, the output
directory is locked; W&B gets the prompt trace and the report as tables, frames and samples as grids.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from featinv import results as R
from featinv.data import TargetSource
from featinv.explain.dexter import DexterConfig, candidate_words, run_dexter
from featinv.explain.diffexplainer import DiffExplainerConfig, run_diffexplainer
from featinv.explain.prompt import Template
from featinv.explain.score import UnitTarget
from featinv.harness import AnalysisModule
from featinv.results import digest, module_digest
from featinv.specs import build_encoder, build_prior
from featinv.viz import comparison_grid

__all__ = ["DexterModule", "ClassTargets", "MODES"]

MODES = ("dexter", "diffexplainer")


class ClassTargets(TargetSource):
    """(target classifier, class) items. ``classifiers``: encoder specs giving logits (e.g.
    ``zoo:shapes-target-biased-shape-bg``); ``classes``: class indices for every classifier, or a dict
    spec -> indices, or None for all classes (shapes world). With ``world: shapes`` each item also carries
    the classifier's truth (class name and factor, planted bias factor and value; ``featinv.explain.shapes``)."""

    def __init__(self, classifiers: list[str], classes: list[int] | dict[str, list[int]] | None = None,
                 name: str = "classes", world: str | None = "shapes"):
        self.name, self.world = name, world
        if not classifiers:
            raise ValueError(f"dataset {name!r}: give at least one classifier")
        self.items_ = []
        for spec in classifiers:
            info = self._info(spec)
            ks = classes.get(spec) if isinstance(classes, dict) else classes
            ks = list(range(len(info["classes"]))) if ks is None else list(ks)
            for k in ks:
                if info["classes"] and not 0 <= int(k) < len(info["classes"]):
                    raise ValueError(f"dataset {name!r}: class {k} out of range for {spec} ({len(info['classes'])} classes)")
                self.items_.append((spec, int(k), info))

    def _info(self, spec: str) -> dict:
        if self.world == "shapes":
            from featinv.explain.shapes import classifier_info

            return classifier_info(spec)
        if self.world is None:
            return dict(label_factor="", classes=[], bias_factor=None, bias_values=None)
        raise ValueError(f"dataset {self.name!r}: unknown world {self.world!r} (shapes or null)")

    def __len__(self):
        return len(self.items_)

    def __getitem__(self, i):
        spec, k, info = self.items_[i]
        item = self.item(i, k, text=spec)
        item.update(class_name=info["classes"][k] if info["classes"] else str(k), class_factor=info["label_factor"],
                    bias_factor=info["bias_factor"] or "", bias_value=(info["bias_values"][k] if info["bias_values"] else ""))
        return item


class DexterModule(AnalysisModule):
    """DEXTER / DiffExplainer over (classifier, class) items (see the module docstring).

    Args:
        prior: text-conditioned prior spec (``zoo:shapes-sd``) or object.
        mode: ``dexter`` (soft prompt -> masked LM -> Gumbel words) or ``diffexplainer`` (soft tokens).
        config: fields of ``DexterConfig`` / ``DiffExplainerConfig`` (steps, lr, tau, sample_steps, cfg_scale, ...).
        world: ``shapes`` supplies the template grammar, the masked LM and the reader's factors; null:
            give ``template``, ``mlm`` (and ``factors`` with a reader).
        mlm: path of a ``save_mlm`` model (default: the world's) or a ``WordMLM``.
        template: ``{text, rewrites, slot_vocab}`` or a ``Template`` (default: the world's).
        reader: judge spec (``zoo:shapes-reader``) reading the frames for the report; null: no report.
        threshold: the reporter's excess over the base rate (0.3).
        sweep_samples: DEXTER in the shapes world: samples per variant prompt of the counterfactual report
            (``reporter.sweep_report``: each non-class factor's words swept over its values); 0: none.
        unit, layer: DiffExplainer's hidden-unit mode: maximise unit ``unit`` of the classifier at ``layer``.
        name: the method name in records (default: the mode).
        frames_shown, samples_shown: images per item in the frames / samples grids.
    """

    def __init__(self, prior: str | nn.Module = "zoo:shapes-sd", mode: str = "dexter", config: dict | None = None,
                 world: str | None = "shapes", mlm: Any = None, template: Any = None, reader: str | None = "zoo:shapes-reader",
                 factors: dict[str, list[str]] | None = None, threshold: float = 0.3, unit: int | None = None,
                 layer: str | None = None, seed: int = 0, name: str | None = None, frames_shown: int = 16,
                 samples_shown: int = 16, sweep_samples: int = 16):
        super().__init__()
        objects = (("prior", prior), ("mlm", mlm), ("template", template), ("reader", reader))
        self.save_hyperparameters(ignore=[k for k, v in objects if not isinstance(v, (str, dict, type(None)))])
        if mode not in MODES:
            raise ValueError(f"model.mode must be one of {MODES}, got {mode!r}")
        cfg_cls = DexterConfig if mode == "dexter" else DiffExplainerConfig
        known = {f.name for f in dataclasses.fields(cfg_cls)}
        bad = sorted(set(config or {}) - known)
        if bad:
            raise ValueError(f"model.config: unknown {mode} option(s) {bad}; options: {sorted(known)}")
        if not isinstance(sweep_samples, int) or isinstance(sweep_samples, bool) or sweep_samples < 0:
            raise ValueError(f"model.sweep_samples={sweep_samples!r} is invalid; it must be an integer >= 0")
        self.sweep_samples = sweep_samples
        self.mode, self.cfg = mode, cfg_cls(**{**(config or {}), "seed": seed})
        self.seed, self.threshold, self.unit, self.layer = seed, float(threshold), unit, layer
        if unit is not None and (mode != "diffexplainer" or not layer):
            raise ValueError("model.unit (a hidden unit to maximise) needs mode: diffexplainer and model.layer")
        self.method = name or mode
        self.frames_shown, self.samples_shown = frames_shown, samples_shown
        self.world = world
        self.template = self._template(template)
        if mode == "dexter" and self.cfg.typed_slots and self.template.slot_vocab is None:
            raise ValueError("model.config.typed_slots needs a template with slot_vocab (the shapes world's has one)")
        self.prior_spec = prior if isinstance(prior, str) else type(prior).__name__
        self.prior = build_prior(prior) if isinstance(prior, str) else prior
        # DiffExplainer reads its soft tokens out as the masked LM's words when there is one
        self.mlm = self._mlm(mlm) if (mode == "dexter" or mlm is not None or world == "shapes") else None
        self.reader = build_encoder(reader) if isinstance(reader, str) else reader
        self.factors = factors if factors is not None else self._factors()
        self._classifiers: dict[str, nn.Module] = {}

    # -- configuration -------------------------------------------------------------------------------
    def _template(self, template) -> Template:
        if isinstance(template, Template):
            return template
        if isinstance(template, dict):
            return Template(template["text"], [tuple(r) for r in template.get("rewrites", [])],
                            slot_vocab=template.get("slot_vocab"))
        if self.world == "shapes":
            from featinv.explain.shapes import TEMPLATE

            return TEMPLATE
        raise ValueError("model.template is required without a world")

    def _mlm(self, mlm):
        if isinstance(mlm, nn.Module):
            return mlm
        if mlm is None and self.world != "shapes":
            raise ValueError("model.mlm is required in dexter mode without a world")
        from featinv.explain.shapes import load_shapes_mlm

        return load_shapes_mlm(mlm)[0]

    def _factors(self):
        if self.reader is None:
            return None
        if self.world == "shapes":
            from featinv.zoo.shapes import FACTORS

            return {k: list(v) for k, v in FACTORS.items()}
        raise ValueError("model.factors is required with a reader and no world")

    def classifier(self, spec: str) -> nn.Module:
        """The classifier of ``spec`` (logits), built once; in unit mode also its encoder at ``layer``."""
        if spec not in self._classifiers:
            self._classifiers[spec] = build_encoder(spec).to(self.device).eval().requires_grad_(False)
            if self.unit is not None:
                base = spec.split("?")[0].split("@")[0]
                self._classifiers[spec + "#unit"] = build_encoder(f"{base}@{self.layer}").to(self.device).eval()
        return self._classifiers[spec]

    def identity(self) -> dict:
        return {"prior": self.prior_spec, "prior_weights": module_digest(self.prior),
                "mlm_weights": module_digest(self.mlm) if self.mlm is not None else None,
                "template": [self.template.text, [list(r) for r in self.template.rewrites],
                             self.template.slot_vocab],
                "reader": module_digest(self.reader) if isinstance(self.reader, nn.Module) else None,
                "seed": self.seed}

    def method_configs(self) -> dict[str, dict]:
        return {self.method: {"mode": self.mode, **dataclasses.asdict(self.cfg), "threshold": self.threshold,
                              "unit": self.unit, "layer": self.layer}}

    def target_hashes(self, batch: dict) -> list[str]:
        """A target is (classifier spec, its weights, class)."""
        return [digest([s, module_digest(self.classifier(s)), int(k)]) for s, k in zip(batch["text"], batch["label"])]

    # -- the predict step ------------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        pred = {"records": [], "images": {}, "grids": {}, "tables": {}}
        hashes = self.target_hashes(batch)
        for b in range(len(batch["index"])):
            key = (batch["dataset"][b], int(batch["index"][b]), self.method, self.seed)
            fp = self.fingerprint(self.method, hashes[b])
            if self.is_done(key, fp):
                continue
            with torch.enable_grad():
                self._explain(batch, b, fp, pred)
        return pred

    def _explain(self, batch: dict, b: int, fp: str, pred: dict) -> None:
        spec, k = batch["text"][b], int(batch["label"][b])
        dataset, index = batch["dataset"][b], int(batch["index"][b])
        clf = self.classifier(spec)
        class_factor = batch["class_factor"][b] or None
        kw = dict(reader=self.reader, factors=self.factors, class_factor=class_factor, threshold=self.threshold)
        if self.mode == "dexter":
            if self.world == "shapes" and self.reader is not None and self.sweep_samples:
                from featinv.explain.shapes import slot_variants

                kw.update(variants=lambda w: slot_variants(w, class_factor), sweep_samples=self.sweep_samples)
            res = run_dexter(self.prior, clf, k, mlm=self.mlm, template=self.template, config=self.cfg, **kw)
            trace_cols = ["restart", "step", "words", "targets", "ce", "mlm", "hit_rate", "value"]
            curve = [r["ce"] for r in res.trace]
        else:
            words = (candidate_words(self.mlm, self.prior.tokenizer) if self.mlm is not None else
                     _template_vocab(self.prior.tokenizer))
            target = UnitTarget(self._classifiers[spec + "#unit"], self.unit) if self.unit is not None else clf
            res = run_diffexplainer(self.prior, target, self.template, words, config=self.cfg,
                                    target_class=None if self.unit is not None else k, **kw)
            trace_cols = ["step", "words", "loss", "hit_rate", "value"]
            curve = [r["loss"] for r in res.trace]
        rec = {"dataset": dataset, "index": index, "label": k, "text": spec, "method": self.method, "seed": self.seed,
               "fingerprint": fp, "prior": self.prior_spec, "classifier": spec, "class_name": batch["class_name"][b],
               "class_factor": class_factor, "words": list(res.words), "prompt": res.prompt,
               "activation_score": res.activation["score"], "activation_mean_value": res.activation["mean_value"],
               "n_frames": len(res.frames), "steps_run": len(res.trace), "nfe": res.nfe, "seconds": round(res.seconds, 2),
               "distances": curve}
        if self.mode == "dexter":
            rec["restarts"] = [" ".join(w) for w in res.restarts]
            rec["chosen_restart"], rec["restart_selection"] = res.chosen, list(res.selection)
            rec["label_updates"] = list(res.label_updates)
        else:
            rec["activation_score_words"] = res.activation_words["score"]
        cw = _class_words(class_factor, batch["class_name"][b])
        rec["class_word_in_prompt"] = _contains(list(res.words), cw)
        truth = batch["bias_factor"][b] or None
        rec["bias_factor"] = truth
        for prefix, rep in (("", res.report), ("sweep_", getattr(res, "sweep", None)),
                            ("contrast_", getattr(res, "contrast", None))):
            if rep is None:
                continue
            rec.update({prefix + "report": rep.text(), prefix + "flags": [f"{f.factor}={f.value}" for f in rep.flags],
                        prefix + "flagged_factors": rep.flagged_factors,
                        prefix + "bias_found": (truth in rep.flagged_factors) if truth else None,
                        prefix + "false_flags": sum(f != truth for f in rep.flagged_factors)})
            pred["tables"][f"{prefix}report/{dataset}_{index:04d}"] = (
                (["factor", "most accepted value", "hit rate", "lowest hit rate", "contrast", "flagged"]
                 if rep.rule == "contrast" else ["factor", "top value", "frequency", "base rate", "excess", "flagged"]),
                rep.rows())
        pred["tables"][f"prompt_trace/{dataset}_{index:04d}"] = (trace_cols, [[r[c] for c in trace_cols] for r in res.trace])
        # images: frames (what the reporter read) and samples of the final prompt (the activation score's)
        samples = res.activation["images"]  # the activation score's samples of the final prompt
        rec["image"] = R.sample_path(dataset, index, self.method)
        pred["images"][rec["image"]] = comparison_grid([samples[: self.samples_shown]])
        if len(res.frames):
            rec["frames_image"] = R.sample_path(dataset, index, self.method, "_frames")
            pred["images"][rec["frames_image"]] = comparison_grid([res.frames[-self.frames_shown:]])
        rows = [samples[: self.samples_shown]] + ([res.frames[-self.frames_shown:]] if len(res.frames) else [])
        pred["grids"][f"{R.GRIDS}/{dataset}_{index:06d}.png"] = comparison_grid(_same_width(rows))
        pred["grid_caption"] = f"{spec} class {batch['class_name'][b]!r}: samples of '{res.prompt}' | last frames"
        pred["records"].append(rec)


def _same_width(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    n = max(len(r) for r in rows)
    return [torch.cat([r, torch.ones(n - len(r), *r.shape[1:])]) if len(r) < n else r for r in rows]


def _class_words(factor: str | None, name: str) -> list[str]:
    if factor:
        from featinv.explain.shapes import class_words

        return class_words(factor, name)
    return name.split()


def _contains(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(words[i:i + n] == phrase for i in range(len(words) - n + 1))


def _template_vocab(tokenizer) -> list[str]:
    """DiffExplainer without a masked LM: every whole-word token of the tokenizer is a readout candidate."""
    return sorted({t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and t[:-4].isalpha()})
