"""DEXTER / DiffExplainer on the shapes world's target classifiers, against activation maximisation.

    python benchmarks/dexter.py --phase val --seed 0 --threads 1 &   # every config on the validation classes,
    python benchmarks/dexter.py --phase val --seed 1 --threads 1; wait  # one run per seed (in parallel on 2 cores)
    python benchmarks/dexter.py --phase choose --seeds 0,1            # pool the seeds: config, guided weight, rule
    python benchmarks/dexter.py --phase test --seed 0 --threads 1 &  # the chosen ones on the test classes,
    python benchmarks/dexter.py --phase test --seed 1 --threads 1; wait # one run per seed
    python benchmarks/dexter.py --phase report --seeds 0,1           # pool the test seeds: dexter.md
    python benchmarks/dexter.py --phase val --smoke --quick --limit 1 --out /tmp/dexter_smoke   # plumbing check

Every single-object target classifier of the shapes world (``featinv.zoo.shapes.targets``: 4 with a
planted bias, 4 unbiased) contributes one *validation* class and two *test* classes (a seeded draw,
disjoint). For each (classifier, class):

* DEXTER (``featinv.explain.dexter.run_dexter``): the explanation words, the activation score of the final
  prompt (share of 100 samples classified as the class; the authors' metric) and the share of those
  samples the independent shapes reader reads as the class value; the reporter's flags over the frames;
* AM baselines on the same classifier and class, 100 images each: ``pixel`` and ``fourier`` (featinv's
  optimisation baselines) and ``guided`` (featinv's guided sampler on the empty-prompt prior), all with a
  ``ClassLogit`` objective; success = share classified as the class (and the reader's class rate);
* optionally DiffExplainer (``--parts ...,diffexplainer``): soft tokens, scored like DEXTER.

Validation: ``--phase val --seed S`` runs every config of ``--configs`` (and the guided baseline's weights)
on the 8 validation classes and writes ``<out>_val_seed<S>.json`` / ``.csv``. ``--phase choose --seeds ...``
pools those seeds (``pool_val``): the chosen config maximises, over the runs of all seeds pooled, mean
activation score + bias-detection F1 (run level, ``SELECT_F1``: the counterfactual contrast rule, ``SWEEP_SAMPLES`` samples per
variant prompt; the other rules' numbers are reported beside it); the guided weight maximises its seed-mean
success; the counterfactual rule (``reporter.sweep_report`` / ``contrast_report``) is the one with the higher
run-level F1 over the chosen config's runs of all seeds. It writes ``<out>_val.json``, which ``--phase test``
reads. ``--phase test --seed S`` runs the chosen config and guided weight on the 16 test classes and writes
``<out>_test_seed<S>.json`` and ``<out>_grid_seed<S>.png``; ``--phase report --seeds ...`` pools the
test seeds (``pool_test``: every run counts; it refuses runs of another choice or split than the _val.json's, a
repeated seed, or runs made differently) and applies the chosen rule. DEXTER's run-level outcome is a discrete
optimisation's, so one seed is one draw - even the CPU model's float rounding changes some runs. Outputs:
``<out>.md`` (tables stamped with commit, command, seeds, machine), ``<out>_runs.csv``, ``<out>_val.csv``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import commit, cpu_model  # noqa: E402

from featinv.contract import make_generators  # noqa: E402
from featinv.explain.dexter import DexterConfig, candidate_words, run_dexter  # noqa: E402
from featinv.explain.diffexplainer import DiffExplainerConfig, run_diffexplainer  # noqa: E402

from featinv.explain.shapes import (  # noqa: E402
    TEMPLATE,
    class_words,
    classifier_info,
    load_shapes_mlm,
    slot_variants,
)
from featinv.methods import get_method  # noqa: E402
from featinv.objectives import ClassLogit  # noqa: E402

CLASSIFIERS = ["biased-shape-bg", "biased-shape-position", "biased-shape-color", "biased-size-bg",
               "unbiased-shape", "unbiased-color", "unbiased-size", "unbiased-position"]
# candidate DEXTER configs for validation (DexterConfig fields); "authors" = the paper's defaults scaled down
CONFIGS = {
    "authors": dict(steps=100, lr=0.1, tau=1.0, mlm_weight=1.0, sample_steps=8, cfg_scale=1.0, batch=2),
    "cfg3": dict(steps=100, lr=0.1, tau=1.0, mlm_weight=1.0, sample_steps=8, cfg_scale=3.0, batch=2),
    "mlm0.3": dict(steps=100, lr=0.1, tau=1.0, mlm_weight=0.3, sample_steps=8, cfg_scale=1.0, batch=2),
    "k4": dict(steps=100, lr=0.1, tau=1.0, mlm_weight=1.0, sample_steps=4, cfg_scale=1.0, batch=2),
    "cfg3-typed": dict(steps=100, lr=0.1, tau=1.0, mlm_weight=1.0, sample_steps=8, cfg_scale=3.0, batch=2,
                       typed_slots=True),
    # cfg3 with two restarts; the explanation is the restart whose words hit most on 16 selection samples
    "cfg3-r2best": dict(steps=100, lr=0.1, tau=1.0, mlm_weight=1.0, sample_steps=8, cfg_scale=3.0, batch=2,
                        restarts=2, select="best"),
}
GUIDED_WEIGHTS = [4.0, 16.0]
DIFFEXPLAINER = dict(steps=100, lr=0.05, sample_steps=8, cfg_scale=1.0, batch=2, loss="logit")
N_AM = 100  # images per AM baseline
SWEEP_SAMPLES = 16  # samples per variant prompt of the counterfactual report (reporter.sweep_report)
# config selection on val: mean activation + this run-level F1 (the contrast rule, chosen on val at 5f86f0e; the
# sweep rule's F1 chose the configs up to then)
SELECT_F1 = "contrast_run_f1"


def split_classes(seed: int = 0) -> dict[str, dict[str, list[int]]]:
    """Per classifier: one validation class and two test classes, a seeded draw without overlap."""
    out = {}
    for i, name in enumerate(CLASSIFIERS):
        n = len(classifier_info(name)["classes"])
        perm = np.random.default_rng([seed, i]).permutation(n).tolist()
        out[name] = {"val": perm[:1], "test": perm[1:3]}
    return out


def load_world(smoke: bool):
    """Prior, reader, masked LM and a classifier loader (``--smoke``: random-init prior and classifiers)."""
    from featinv.specs import build_encoder, build_prior
    from featinv.zoo.shapes.judges import Judge

    mlm, _ = load_shapes_mlm()
    reader = Judge("shapes-reader")
    if not smoke:
        return build_prior("zoo:shapes-sd"), reader, mlm, lambda n: build_encoder(f"zoo:shapes-target-{n}")
    from featinv.encoders import Encoder
    from featinv.priors import LatentPrior
    from featinv.zoo.shapes import sd, targets, text

    torch.manual_seed(0)
    tok = text.build_tokenizer()
    prior = LatentPrior(sd.build_unet(), sd.build_vae(), sd.build_scheduler(),
                        text_encoder=sd.build_text_encoder(len(tok)), tokenizer=tok)
    return prior, reader, mlm, lambda n: Encoder(targets.build(n).eval(), None, name=n)


def reader_rate(reader, images: torch.Tensor, factor: str, value: int) -> float:
    read = reader.read(images)
    return float((read[factor][0] == value).float().mean())


def am_baselines(prior, clf, k: int, reader, info: dict, guided_weight: float, seed: int, n: int) -> dict:
    out = {}
    n_cls = len(info["classes"])
    for name in ("pixel", "fourier", "guided"):
        kw = dict(objective=ClassLogit(k))
        if name == "guided":
            method = get_method("fast", name="guided", steps=25, recurrence=1, early_steps=0, weight=guided_weight, **kw)
        else:
            method = get_method(name, **kw)
        t0 = time.time()
        imgs = []
        for i in range(0, n, 50):
            m = min(50, n - i)
            res = method(prior, clf, torch.zeros(m, n_cls), make_generators(range(seed + i, seed + i + m)))
            imgs.append(res.images)
        imgs = torch.cat(imgs)
        with torch.no_grad():
            hit = (clf(imgs).argmax(1) == k).float().mean().item()
        out[name] = dict(success=hit, reader_class=reader_rate(reader, imgs, info["label_factor"], k),
                         seconds=round(time.time() - t0, 1), images=imgs[:8])
    return out


def run_item(prior, reader, mlm, clf, name: str, k: int, cfg: dict, mode: str, seed: int) -> dict:
    info = classifier_info(name)
    factor, value = info["label_factor"], info["classes"][k]
    from featinv.zoo.shapes import FACTORS

    factors = {f: list(v) for f, v in FACTORS.items()}
    kw = dict(reader=reader, factors=factors, class_factor=factor)
    if mode == "dexter":
        res = run_dexter(prior, clf, k, mlm=mlm, template=TEMPLATE, config=DexterConfig(**cfg, seed=seed),
                         variants=lambda w: slot_variants(w, factor), sweep_samples=SWEEP_SAMPLES, **kw)
    else:
        words = candidate_words(mlm, prior.tokenizer)
        res = run_diffexplainer(prior, clf, TEMPLATE, words, target_class=k,
                                config=DiffExplainerConfig(**cfg, seed=seed), **kw)
    samples = res.activation["images"]  # the activation score's samples of the final prompt
    truth = info["bias_factor"]
    truth_value = info["bias_values"][k] if truth else None
    row = dict(classifier=name, class_index=k, class_name=value, class_factor=factor, bias_factor=truth or "",
               bias_value=truth_value or "", mode=mode, words=" ".join(res.words),
               prompt=res.prompt, activation_score=res.activation["score"],
               reader_class=reader_rate(reader, samples, factor, k), n_frames=len(res.frames),
               **_flags(res.report, truth, truth_value, ""),
               class_word=_contains(list(res.words), class_words(factor, value)),
               **(_flags(res.sweep, truth, truth_value, "sweep_") if res.sweep else {}),
               **(_flags(res.contrast, truth, truth_value, "contrast_") if res.contrast else {}),
               steps_run=len(res.trace), seconds=round(res.seconds, 1))
    if mode == "dexter":
        row.update(chosen_restart=res.chosen, selection=";".join(f"{v:.3f}" for v in res.selection))
    if mode == "diffexplainer":
        row["activation_score_words"] = res.activation_words["score"]
    return row, samples[:8], res.frames[-8:]


def _flags(rep, truth, truth_value, prefix: str) -> dict:
    """A report's flags as row fields (``prefix`` + flags / bias_found / bias_value_found / false_flags)."""
    return {prefix + "flags": ";".join(f"{f.factor}={f.value}" for f in rep.flags),
            prefix + "bias_found": (truth in rep.flagged_factors) if truth else "",
            prefix + "bias_value_found": any(f.factor == truth and f.value == truth_value for f in rep.flags)
            if truth else "",
            prefix + "false_flags": sum(f != truth for f in rep.flagged_factors)}


def _contains(words, phrase):
    n = len(phrase)
    return any(words[i:i + n] == phrase for i in range(len(words) - n + 1))


def bias_prf(rows: list[dict], prefix: str = "") -> dict:
    """Run level: TP = a biased classifier's run flags its bias factor; FP = every other flagged factor;
    FN = a biased run that misses it. Classifier level: a factor counts as flagged for a classifier if
    flagged in the majority (>= half) of its runs. ``prefix``: "" the frame rule, "sweep_" / "contrast_" the
    counterfactual rules (``reporter.sweep_report`` / ``reporter.contrast_report``)."""
    tp = sum(1 for r in rows if r["bias_factor"] and r[prefix + "bias_found"] is True)
    fn = sum(1 for r in rows if r["bias_factor"] and r[prefix + "bias_found"] is not True)
    fp = sum(r[prefix + "false_flags"] for r in rows)
    out = dict(run_tp=tp, run_fp=fp, run_fn=fn, run_precision=tp / (tp + fp) if tp + fp else float("nan"),
               run_recall=tp / (tp + fn) if tp + fn else float("nan"))
    by = {}
    for r in rows:
        by.setdefault(r["classifier"], []).append(r)
    ctp = cfp = cfn = 0
    for name, rs in by.items():
        counts = {}
        for r in rs:
            for f in r[prefix + "flags"].split(";") if r[prefix + "flags"] else []:
                counts[f.split("=")[0]] = counts.get(f.split("=")[0], 0) + 1
        flagged = {f for f, c in counts.items() if c >= len(rs) / 2}
        truth = rs[0]["bias_factor"]
        ctp += int(bool(truth) and truth in flagged)
        cfn += int(bool(truth) and truth not in flagged)
        cfp += len(flagged - {truth})
    out.update(clf_tp=ctp, clf_fp=cfp, clf_fn=cfn,
               clf_precision=ctp / (ctp + cfp) if ctp + cfp else float("nan"),
               clf_recall=ctp / (ctp + cfn) if ctp + cfn else float("nan"))
    p, r = out["run_precision"], out["run_recall"]
    out["run_f1"] = 2 * p * r / (p + r) if p + r and p == p and r == r else 0.0
    return out


def classifier_meta() -> dict:
    path = Path(__file__).resolve().parents[1] / "featinv" / "zoo" / "weights" / "meta.json"
    meta = json.loads(path.read_text()) if path.exists() else {}
    return meta.get("shapes-targets", {}).get("models", {})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["val", "choose", "test", "report"], required=True)
    ap.add_argument("--parts", default="dexter,baselines", help="comma list of dexter, baselines, diffexplainer")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="validation: configs to try")
    ap.add_argument("--out", default="benchmarks/results/dexter")
    ap.add_argument("--seed", type=int, default=0, help="optimisation, sampling and baseline seeds")
    ap.add_argument("--seeds", default="0,1", help="--phase choose / report: the validation / test seeds to pool")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="the val / test class split; keep it fixed when repeating a phase with other --seed values "
                         "(a different split puts test classes into val)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="only the first N classifiers (quick checks)")
    ap.add_argument("--smoke", action="store_true", help="random-init prior and classifiers (plumbing check only)")
    ap.add_argument("--quick", action="store_true", help="3 optimisation steps, 8 samples per score / baseline (CI)")
    a = ap.parse_args()
    if a.quick:
        global N_AM, SWEEP_SAMPLES
        N_AM, SWEEP_SAMPLES = 8, 2
        for c in list(CONFIGS.values()) + [DIFFEXPLAINER]:
            c.update(steps=3, score_samples=8)
    torch.set_num_threads(a.threads)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    t_start = time.time()
    split = split_classes(a.split_seed)
    command = "python benchmarks/dexter.py " + " ".join(sys.argv[1:])
    meta = dict(commit=commit(), command=command, seed=a.seed, split_seed=a.split_seed, phase=a.phase, smoke=a.smoke,
                quick=a.quick,
                machine=f"{platform.machine()} ({cpu_model()}), {os.cpu_count()} CPU cores, torch threads {a.threads}",
                torch=torch.__version__, split=split)
    if a.phase == "choose":
        return choose(a, meta)
    if a.phase == "report":
        return report(a, meta)
    prior, reader, mlm, load_clf = load_world(a.smoke)
    names = CLASSIFIERS[: a.limit] if a.limit else CLASSIFIERS
    items = [(n, k) for n in names for k in split[n][a.phase]]
    parts = a.parts.split(",")
    clfs = {n: load_clf(n).to(prior.device) for n in names}
    if a.phase == "val":
        return validate(a, prior, reader, mlm, clfs, items, meta, parts, t_start)
    return test(a, prior, reader, mlm, clfs, items, meta, parts, t_start)


def summarise(rows: list[dict]) -> dict:
    """One config's validation runs: mean activation, the bias P/R/F1 of every reporter rule, class-word rate,
    seconds and the selection score (mean activation + ``SELECT_F1``)."""
    unb = [r for r in rows if not r["bias_factor"]]
    out = dict(activation=float(np.mean([r["activation_score"] for r in rows])), **bias_prf(rows),
               class_word=float(np.mean([r["class_word"] for r in unb])) if unb else float("nan"),
               seconds=float(np.sum([r["seconds"] for r in rows])))
    for rule in RULES:
        out.update({f"{rule}_{k}": v for k, v in bias_prf(rows, rule + "_").items()})
    out["selection"] = out["activation"] + out[SELECT_F1]
    return out


def validate(a, prior, reader, mlm, clfs, items, meta, parts, t_start):
    """Every config and guided weight on the validation classes with one seed -> ``<out>_val_seed<S>.json``."""
    rows, summary = [], {}
    for cname in a.configs.split(","):
        crow = []
        for name, k in items:
            row, _, _ = run_item(prior, reader, mlm, clfs[name], name, k, CONFIGS[cname], "dexter", a.seed)
            row.update(config=cname, seed=a.seed)
            crow.append(row)
            print(json.dumps(row), flush=True)
        summary[cname] = summarise(crow)
        print(cname, json.dumps(summary[cname]), flush=True)
        rows += crow
    guided = {}
    if "baselines" in parts:
        for w in GUIDED_WEIGHTS:
            s = []
            for name, k in items:
                info = classifier_info(name)
                method = get_method("fast", name="guided", steps=25, recurrence=1, early_steps=0, weight=w,
                                    objective=ClassLogit(k))
                n = min(32, N_AM)
                gens = make_generators(range(1000 * a.seed, 1000 * a.seed + n))
                res = method(prior, clfs[name], torch.zeros(n, len(info["classes"])), gens)
                with torch.no_grad():
                    s.append(float((clfs[name](res.images).argmax(1) == k).float().mean()))
            guided[str(w)] = float(np.mean(s))
            print("guided weight", w, guided[str(w)], flush=True)
    out = dict(meta={**meta, "seconds": round(time.time() - t_start)}, configs=a.configs.split(","),
               config_values={c: CONFIGS[c] for c in a.configs.split(",")}, summary=summary, guided=guided, rows=rows)
    path = f"{a.out}_val_seed{a.seed}.json"
    Path(path).write_text(json.dumps(out, indent=1))
    _csv(rows, f"{a.out}_val_seed{a.seed}.csv")
    print(f"wrote {path}; next: python benchmarks/dexter.py --phase choose --seeds ...", flush=True)


RULES = ("sweep", "contrast")  # counterfactual reporter rules; the first wins ties


def _refuse_mixed(metas: list[dict], phase: str) -> None:
    """Per-seed runs pool only if made the same way (--smoke, --quick) with distinct seeds."""
    for key in ("smoke", "quick"):
        if any(m.get(key) != metas[0].get(key) for m in metas):
            sys.exit(f"the {phase} runs differ in --{key}; pool runs made the same way")
    if len({m["seed"] for m in metas}) != len(metas):
        sys.exit(f"two {phase} runs share a seed; pool distinct seeds")


def pool_val(runs: list[dict]) -> dict:
    """Pool per-seed validation files (``validate``'s output) into the choice ``--phase test`` reads: the config
    with the best selection over the pooled runs (earlier config wins ties), the guided weight with the best
    seed-mean success, the counterfactual rule with the higher run-level F1 over the chosen config's runs."""
    metas = [r["meta"] for r in runs]
    for m in metas[1:]:
        if m["split"] != metas[0]["split"]:
            sys.exit("the validation runs were made on different class splits (--split-seed); pool runs of one split")
    _refuse_mixed(metas, "validation")
    items = [{(row["classifier"], row["class_index"]) for row in r["rows"]} for r in runs]
    if any(i != items[0] for i in items):
        sys.exit("the validation runs cover different classes (--limit?); pool runs over the same classes")
    configs = [c for c in runs[0]["configs"] if all(r["config_values"].get(c) == runs[0]["config_values"][c]
                                                    for r in runs)]
    dropped = sorted({c for r in runs for c in r["configs"]} - set(configs))
    if not configs:
        sys.exit("the validation runs share no config with the same values; run --phase val with the same "
                 "--configs (and --quick or not) for every seed")
    if dropped:
        print(f"left out (not run with the same values on every seed): {', '.join(dropped)}", flush=True)
    if any(set(r["guided"]) != set(runs[0]["guided"]) for r in runs):
        sys.exit("the validation runs measured different guided weights (--parts without baselines?); rerun them")
    rows = [row for r in runs for row in r["rows"] if row["config"] in configs]
    summary = {c: summarise([row for row in rows if row["config"] == c]) for c in configs}
    best = max(configs, key=lambda c: (summary[c]["selection"], -configs.index(c)))
    guided = {w: float(np.mean([r["guided"][w] for r in runs])) for w in runs[0]["guided"]}
    best_w = float(max(guided, key=guided.get)) if guided else GUIDED_WEIGHTS[0]
    best_rows = [row for row in rows if row["config"] == best]
    rules = {r: bias_prf(best_rows, r + "_") for r in RULES}
    rule = max(RULES, key=lambda r: (rules[r]["run_f1"], -RULES.index(r)))
    per_seed = {str(m["seed"]): {c: summarise([row for row in r["rows"] if row["config"] == c])["selection"]
                                 for c in configs} for m, r in zip(metas, runs)}
    return dict(summary=summary, chosen=best, config=runs[0]["config_values"][best], guided=guided, guided_weight=best_w,
                selection_f1=SELECT_F1, rule=rule, rule_summary=rules, rule_activation=summary[best]["activation"],
                per_seed_selection=per_seed, seeds=[m["seed"] for m in metas],
                val_meta=[{k: m[k] for k in ("commit", "command", "seed", "machine", "seconds")} for m in metas],
                rows=rows)


def choose(a, meta):
    paths = [Path(f"{a.out}_val_seed{s}.json") for s in a.seeds.split(",")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        sys.exit(f"{', '.join(missing)} not found: run --phase val --seed S for each of --seeds first")
    runs = [json.loads(p.read_text()) for p in paths]
    pooled = pool_val(runs)
    rows = pooled.pop("rows")
    first = runs[0]["meta"]
    meta = {**meta, "seeds": pooled["seeds"], "split": first["split"], "split_seed": first.get("split_seed"),
            "smoke": first.get("smoke"), "quick": first.get("quick")}
    Path(a.out + "_val.json").write_text(json.dumps(dict(meta=meta, **pooled), indent=1))
    _csv(rows, a.out + "_val.csv")
    print(f"chosen: {pooled['chosen']} {pooled['config']}; guided weight {pooled['guided_weight']}; "
          f"rule {pooled['rule']}; selection per seed {pooled['per_seed_selection']}")


def test(a, prior, reader, mlm, clfs, items, meta, parts, t_start):
    if not Path(a.out + "_val.json").exists():
        sys.exit(f"{a.out}_val.json not found: run --phase val per seed, then --phase choose")
    val = json.loads(Path(a.out + "_val.json").read_text())
    if val["meta"].get("split", meta["split"]) != meta["split"]:
        sys.exit(f"{a.out}_val.json was chosen on another class split (--split-seed "
                 f"{val['meta'].get('split_seed', val['meta']['seed'])}); run --phase test with that --split-seed")
    cfg, w = val["config"], val["guided_weight"]
    if a.quick:  # the chosen config, shortened like every validation config (plumbing check)
        cfg = {**cfg, "steps": 3, "score_samples": 8}
    rows, pics = [], []
    for name, k in items:
        info = classifier_info(name)
        if "dexter" in parts:
            row, samples, frames = run_item(prior, reader, mlm, clfs[name], name, k, cfg, "dexter", a.seed)
            if "baselines" in parts:
                am = am_baselines(prior, clfs[name], k, reader, info, w, 20_000 + a.seed, N_AM)
                for m, v in am.items():
                    row[f"{m}_success"], row[f"{m}_reader_class"], row[f"{m}_seconds"] = (
                        v["success"], v["reader_class"], v["seconds"])
                pics.append((f"{name} / {row['class_name']}: {row['prompt']}", [samples, frames] +
                             [am[m]["images"] for m in ("pixel", "fourier", "guided")]))
            rows.append(row)
            print(json.dumps(row), flush=True)
        if "diffexplainer" in parts:
            drow, _, _ = run_item(prior, reader, mlm, clfs[name], name, k, DIFFEXPLAINER, "diffexplainer", a.seed)
            rows.append(drow)
            print(json.dumps(drow), flush=True)
    meta["seconds"] = round(time.time() - t_start)
    meta.update(chosen=val["chosen"], config=val["config"], guided_weight=w)  # (--quick shortened it: meta["quick"])
    stem = f"{a.out}_test_seed{a.seed}"
    Path(stem + ".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    if pics:
        _grid(pics, f"{a.out}_grid_seed{a.seed}.png")
    print(f"wrote {stem}.json; pool the test seeds with --phase report --seeds ...", flush=True)


def pool_test(runs: list[dict], val: dict) -> list[dict]:
    """The test runs of every seed (``test``'s per-seed files) as one list of rows, each with its ``seed``;
    refuses runs made with another choice than ``val``'s, on another split, twice with one seed, made
    differently (--smoke / --quick) or over different classes."""
    metas = [r["meta"] for r in runs]
    _refuse_mixed(metas, "test")
    for m in metas:
        if (m["chosen"], m["config"], m["guided_weight"]) != (val["chosen"], val["config"], val["guided_weight"]):
            sys.exit(f"the test run of seed {m['seed']} used another choice ({m['chosen']}, guided weight "
                     f"{m['guided_weight']}) than {val['chosen']}, {val['guided_weight']} in the _val.json; rerun it")
        if m["split"] != val["meta"]["split"]:
            sys.exit(f"the test run of seed {m['seed']} was made on another class split (--split-seed) than the "
                     "_val.json's; pool runs of its split")
    items = [sorted((row["classifier"], row["class_index"], row["mode"], tuple(sorted(row))) for row in r["rows"])
             for r in runs]  # the same runs with the same fields (--parts)
    if any(i != items[0] for i in items):
        sys.exit("the test runs cover different classes or parts (--limit, --parts?); pool runs over the same ones")
    return [{"seed": m["seed"], **row} for m, r in zip(metas, runs) for row in r["rows"]]


def report(a, meta):
    """``--phase report --seeds ...``: ``<out>.md`` and ``<out>_runs.csv`` from the per-seed test files."""
    paths = [Path(f"{a.out}_test_seed{s}.json") for s in a.seeds.split(",")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        sys.exit(f"{', '.join(missing)} not found: run --phase test --seed S for each of --seeds first")
    if not Path(a.out + "_val.json").exists():
        sys.exit(f"{a.out}_val.json not found: run --phase val per seed, then --phase choose")
    val = json.loads(Path(a.out + "_val.json").read_text())
    runs = [json.loads(p.read_text()) for p in paths]
    rows = pool_test(runs, val)
    _csv(rows, a.out + "_runs.csv")
    grids = [f"{Path(a.out).name}_grid_seed{r['meta']['seed']}.png" for r in runs
             if Path(f"{a.out}_grid_seed{r['meta']['seed']}.png").exists()]
    write_report(a, rows, val, [r["meta"] for r in runs], {**meta, "grids": grids})
    print(f"wrote {a.out}.md and {a.out}_runs.csv ({len(rows)} runs, seeds {a.seeds})", flush=True)


def _csv(rows, path):
    cols = sorted({k for r in rows for k in r}, key=lambda c: [k for r in rows for k in r].index(c))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _grid(pics, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["DEXTER prompt samples", "DEXTER frames", "pixel AM", "fourier AM", "guided AM"]
    fig, axes = plt.subplots(len(pics), len(cols), figsize=(3.2 * len(cols), 1.0 * len(pics) + 0.6))
    axes = np.atleast_2d(axes)
    for i, (title, groups) in enumerate(pics):
        for j, g in enumerate(groups):
            ax = axes[i, j]
            ax.axis("off")
            if len(g):  # padded to 8 images (white), so that a run with few frames is drawn at the same scale
                g = g[:8].clamp(0, 1)
                g = torch.cat([g, g.new_ones(8 - len(g), *g.shape[1:])])
                ax.imshow(torch.cat(list(g), dim=2).permute(1, 2, 0).numpy())
            if i == 0:
                ax.set_title(cols[j], fontsize=9)
        axes[i, 0].text(-2, 16, title, fontsize=6, ha="right", va="center")
    plt.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    from PIL import Image

    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)  # ~4x smaller; few colours here


def write_report(a, rows, val, test_metas, meta):
    """benchmarks/results/dexter.md (see the module docstring)."""
    from _dexter_report import render

    Path(a.out + ".md").write_text(render(rows, val, test_metas, meta, classifier_meta(), bias_prf))


if __name__ == "__main__":
    main()
