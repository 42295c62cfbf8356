"""DiffEx on the shapes world with LEDITS++ on the mini SD, scored against the renderer's exact edits (issue 14).

    python benchmarks/diffex.py --phase val      # choose the edit mode, LEDITS++ guidance, threshold, skip, steps
    python benchmarks/diffex.py --phase val-combine  # then how a family's keywords make one edit (sum / mean)
    python benchmarks/diffex.py                  # test: 8 single-object classifiers, 24 scenes x 2 seeds
    python benchmarks/diffex.py --phase render   # rewrite OUT.md from a test run's OUT.json

Validation: every hierarchy keyword edited on the first ``n_val`` val scenes (seed 0) for each LEDITS++
setting and edit mode (``--val-context``: 0 = DiffEx's bare keyword prompt, 1 = in-context edits, the
scenes captioned by the reader and each keyword put into the caption; featinv.explain.ledits); edit
success (the reader sees the requested value) and leakage (the reader sees another factor change) --
classifier-free, so nothing about the explained classifiers is tuned. Chosen: the highest success with
leakage <= 0.10 (else the highest success - leakage). Stage 1 grids edit mode x guidance x threshold x
skip at ``--val-steps[0]``; stage 2 the step counts at the stage-1 choice; stage 3 (``--phase val-combine``)
the family edits' combination (``LeditsEditor(combine=...)``), judged on the level-1 edits by the same rule.

Test: on the first ``n`` test scenes, for each classifier and target class: DiffEx (beam search over
configs/explain/hierarchy_shapes.yaml, Delta = mean over scenes and seeded edits of P(class | edit) -
P(class | scene)), every keyword also scored (``score_all_leaves``) for the comparison; the oracle =
the same with the renderer's exact edits. What must hold: edit success >= 80 % with leakage <= 10 %;
Spearman(DiffEx Delta, oracle Delta) over keywords >= 0.7; factors the classifier truly uses (oracle
|Delta| >= 0.05 for some keyword) recalled in the top-k >= 0.8; the true parent stays in the beam and
the true child (largest oracle |Delta|) ranks first. Writes OUT.md, OUT.csv, OUT.json, OUT_*.png.
"""
from __future__ import annotations

import argparse
import csv
import itertools
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

from featinv.explain import shapes_oracles as SO  # noqa: E402
from featinv.explain.diffex import EditScorer, Hierarchy, compare, edit_quality, run_diffex, spearman  # noqa: E402
from featinv.explain.ledits import LeditsEditor, load_ledits_pipeline  # noqa: E402
from featinv.explain.plots import keyword_bars  # noqa: E402
from featinv.viz import comparison_grid, save_png  # noqa: E402
from featinv.zoo.shapes import world as W  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("steps", "skip", "edit_guidance_scale", "edit_threshold", "context", "combine")
DEFAULTS = {"context": False, "combine": "sum"}  # when val chose neither: DiffEx's bare keywords, LEDITS++'s sum
CLASSIFIERS = ["unbiased-shape:circle", "unbiased-color:red", "unbiased-size:large", "unbiased-position:top left",
               "biased-shape-bg:circle", "biased-shape-position:star", "biased-shape-color:triangle", "biased-size-bg:small"]


def sd_dir(a) -> Path:
    from featinv.zoo.shapes import shapes_sd_dir

    return Path(a.sd) if Path(a.sd).is_dir() else shapes_sd_dir(a.sd, a.weights)


def editor(pipe, images, reader, context=False, **ledits) -> LeditsEditor:
    """LEDITS++ on ``images``; ``context``: in-context edits, the images captioned by the reader (the stand-in for
    DiffEx's VLM) and every keyword put into each image's caption (``shapes_oracles.rewrite_caption``)."""
    if context:
        ledits.update(SO.context_edits(images, reader))
    return LeditsEditor(pipe, images, **ledits)


def quality(pipe, images, h, reader, seeds, **ledits) -> tuple[dict, EditScorer]:
    ed = editor(pipe, images, reader, **ledits)
    s = EditScorer(ed, lambda x: torch.zeros(len(x)), images, seeds)
    for leaf in h.leaves:
        for sd in s.seeds:
            s.images(leaf, sd)
    return edit_quality(s, images, h.leaves, reader, SO.keyword_factor), s


def pick(rows):
    ok = [r for r in rows if r["leakage"] <= 0.10]
    return max(ok, key=lambda r: r["success"]) if ok else max(rows, key=lambda r: r["success"] - r["leakage"])


def validate(a, meta, h, pipe, reader):
    x, _ = W.load_split("single", "val", a.n_val)
    rows = []

    def run(**cfg):
        t0 = time.time()
        q, _ = quality(pipe, x, h, reader, [0], batch=a.batch, **cfg)
        rows.append({**cfg, "success": q["success"], "leakage": q["leakage"], "seconds": round(time.time() - t0, 1),
                     "per_factor": q["per_factor"]})
        print({k: v for k, v in rows[-1].items() if k != "per_factor"}, flush=True)

    for ctx, g, th, sk in itertools.product(a.val_context, a.val_guidance, a.val_threshold, a.val_skip):
        run(steps=a.val_steps[0], skip=sk, edit_guidance_scale=g, edit_threshold=th, context=bool(ctx))
    best = pick(rows)
    for st in a.val_steps[1:]:
        run(steps=st, skip=best["skip"], edit_guidance_scale=best["edit_guidance_scale"],
            edit_threshold=best["edit_threshold"], context=best["context"])
    best = pick(rows)
    chosen = {k: best[k] for k in KEYS if k in best}  # combine: stage 3 (--phase val-combine)
    meta.update(phase="val", n=a.n_val, grid=rows, chosen=chosen)
    lines = ["# DiffEx editor (LEDITS++ on zoo:shapes-sd): choice of its hyper-parameters on validation scenes\n",
             f"{a.n_val} val scenes x {len(h.leaves)} keywords, seed 0, scheduler {a.scheduler}; commit "
             f"`{meta['commit']}`; machine: {meta['machine']}; {{wall}}.", f"Command: `{meta['command']}`\n",
             "Criterion (classifier-free): the highest edit success with leakage <= 0.10 (else the highest success - "
             "leakage); stage 1 edit mode x guidance x threshold x skip, stage 2 the step count. Edit mode: `keyword` = "
             "DiffEx's bare keyword prompt; `in context` = each scene captioned by the reader (the stand-in for DiffEx's "
             "VLM), inverted with its caption and edited toward the caption with the keyword put in (featinv.explain.ledits)."
             "\n",
             "| edit mode | steps | skip | edit guidance | threshold | success | leakage | s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {'in context' if r.get('context') else 'keyword'} | {r['steps']} | {r['skip']} | "
              f"{r['edit_guidance_scale']} | {r['edit_threshold']} | {r['success']:.3f} | "
              f"{r['leakage']:.3f} | {r['seconds']} |" for r in rows]
    lines += ["", f"Chosen: {chosen}.", "", "Per factor at the chosen setting (success / leakage): " + ", ".join(
        f"{f} {v['success']:.2f} / {v['leakage']:.2f}" for f, v in best["per_factor"].items())]
    return "\n".join(lines) + "\n"


def validate_combine(a, meta, h, pipe, reader):
    """Stage 3 (after ``--phase val``): how a family's keywords are combined into its one edit, at the chosen
    keyword setting, judged on the level-1 edits alone (the reader sees a value of the family; leakage as
    for keywords) by the same rule; the choice is added to OUT_val.json and OUT_val.md."""
    path = Path(a.out + "_val.json")
    if not path.exists():
        sys.exit(f"{path} not found: run --phase val first")
    val = json.loads(path.read_text())
    x, _ = W.load_split("single", "val", val["n"])
    fams = [n for n in h.level1 if len(n.prompts) > 1]
    rows = []
    for combine in a.val_combine:
        t0 = time.time()
        cfg = {**{k: v for k, v in val["chosen"].items() if k != "combine"}, "combine": combine}
        ed = editor(pipe, x, reader, batch=a.batch, **{**cfg, "steps": int(cfg["steps"])})
        s = EditScorer(ed, lambda z: torch.zeros(len(z)), x, [0])
        for n in fams:
            s.images(n, 0)
        q = edit_quality(s, x, fams, reader, SO.keyword_factor)
        rows.append({"combine": combine, "success": q["success"], "leakage": q["leakage"],
                     "seconds": round(time.time() - t0, 1), "per_factor": q["per_factor"]})
        print({k: v for k, v in rows[-1].items() if k != "per_factor"}, flush=True)
    best = pick(rows)
    val["chosen"]["combine"] = best["combine"]
    val["combine_grid"], val["combine_command"], val["combine_commit"] = rows, meta["command"], meta["commit"]
    path.write_text(json.dumps(val, indent=1, allow_nan=False))
    lines = ["", "## Stage 3: family edits (`--phase val-combine`)\n",
             f"Commit `{meta['commit']}`; command `{meta['command']}`. The {len(fams)} level-1 items with several "
             f"keywords ({', '.join(n.name for n in fams)}), each one multi-prompt edit at the chosen setting, on "
             f"the same {val['n']} val scenes (seed 0); success = the reader sees a value of the family. `sum`: "
             "LEDITS++ adds each keyword's guidance at full scale; `mean`: each at scale / K (the family's mean "
             "direction). Same rule as above.\n",
             "| combine | success | leakage | s |", "|---|---|---|---|"]
    lines += [f"| {r['combine']} | {r['success']:.3f} | {r['leakage']:.3f} | {r['seconds']} |" for r in rows]
    lines += ["", f"Chosen: combine = {best['combine']}."]
    md = Path(a.out + "_val.md")
    text = md.read_text() if md.exists() else ""
    text = text.split("\n## Stage 3: family edits")[0].rstrip("\n") + "\n"  # a rerun replaces its section
    md.write_text(text + "\n".join(lines) + "\n")
    print("\n".join(lines))


def score_fn(name, a):
    from featinv.zoo.shapes import targets

    model, cls = name.rsplit(":", 1)
    factor = targets.BIASED[model].label if model in targets.BIASED else targets.UNBIASED[model]
    k = W.FACTORS[factor].index(cls)
    clf = SO.target_classifier(model, a.weights)
    return lambda x: torch.cat([clf(x[i:i + 256].float()).softmax(1)[:, k] for i in range(0, len(x), 256)])


def test(a, meta, h, pipe, reader):
    x, rows = W.load_split("single", "test", a.n)
    chosen = {k: getattr(a, k) for k in KEYS}
    ed = editor(pipe, x, reader, batch=a.batch, **chosen)
    oracle_ed = SO.RendererEditor(rows)
    edits, oedits, out, t0 = {}, {}, [], time.time()
    factor_of = lambda k: SO.keyword_factor(k.rsplit("/", 1)[-1])[0]  # noqa: E731
    results = {}
    for name in a.classifiers:
        score = score_fn(name, a)
        s = EditScorer(ed, score, x, a.seeds, edited=edits)
        so = EditScorer(oracle_ed, score, x, edited=oedits)
        r = run_diffex(h, s, beam_size=a.beam, top_k=a.top_k, score_all_leaves=True)
        o = run_diffex(h, so, beam_size=a.beam, top_k=a.top_k, score_all_leaves=True)
        c = compare(r, o, factor_of, a.used_threshold)
        truth = SO.target_truth(name.rsplit(":", 1)[0], a.weights)
        planted = [truth.get("label_factor")] + ([truth["bias_factor"]] if "bias_factor" in truth else [])
        results[name] = (r, o)
        out.append(dict(classifier=name, planted=planted, used=c["used_factors"], top_factors=c["top_factors"],
                        recall=c["recall"], spearman=c["spearman"], spearman_abs=c["spearman_abs"],
                        true_child=c["true_child"], diffex_top=r.top[0][0] if r.top else None,
                        child_first=int(c["child_first"]), parent_in_beam=int(c["parent_in_beam"]), beam=r.beam,
                        top=[[p, round(d, 4)] for p, d in r.top], diffex_all=r.all_leaves, oracle_all=o.all_leaves,
                        oracle_top=o.top[0][0], base_score=r.base_score))
        print(name, {k: out[-1][k] for k in ("used", "recall", "spearman", "true_child", "diffex_top")}, flush=True)
    q = edit_quality(s, x, h.leaves, reader, SO.keyword_factor)
    meta.update(phase="test", n=a.n, seeds=a.seeds, ledits={**chosen, "scheduler": a.scheduler}, beam_size=a.beam,
                top_k=a.top_k, used_threshold=a.used_threshold, rows=out, edit_quality=q,
                edits=ed.edits, inversions=ed.inversions, edit_seconds=round(time.time() - t0, 1))
    figures(a, results, x, s, h)
    return report(meta)


def figures(a, results, x, s, h):
    import matplotlib.pyplot as plt

    for name in list(results)[:2]:
        r, o = results[name]
        fig = keyword_bars({"diffex": r.all_leaves, "oracle": o.all_leaves}, title=f"DiffEx vs oracle: {name}")
        fig.savefig(f"{a.out}_{name.replace(':', '_').replace(' ', '-')}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    show = ["shape/round/circle", "shape/polygon/star", "color/warm/red", "color/cool/blue", "size/big/large",
            "position/top/top left", "background/light/white"]
    save_png(comparison_grid([x[:8]] + [s.images(h.node(k), s.seeds[0])[:8] for k in show]), f"{a.out}_grid.png")


def report(m):
    q, rows = m["edit_quality"], m["rows"]
    ok = lambda b: "holds" if b else "MISSES"  # noqa: E731
    sp = [r["spearman"] for r in rows]
    rec = [r["recall"] for r in rows if r["recall"] is not None]
    lines = ["# DiffEx on the shapes world vs the renderer's exact edits\n",
             f"{m['n']} test scenes, seeds {m['seeds']}, LEDITS++ {m['ledits']} ({m['ledits_source']}), beam "
             f"{m['beam_size']}, top-k {m['top_k']}; {m['inversions']} inversions, {m['edits']} keyword edits; commit "
             f"`{m['commit']}`; machine: {m['machine']}; {{wall}}.", f"Command: `{m['command']}`\n",
             "Hierarchy: configs/explain/hierarchy_shapes.yaml (hand-written stand-in for DiffEx's VLM/LLM). Score: "
             "the classifier's probability of the target class.\n",
             "## What must hold\n", "| check | target | measured | |", "|---|---|---|---|",
             f"| edit success / leakage (reader) | >= 0.80 / <= 0.10 | {q['success']:.3f} / {q['leakage']:.3f} | "
             f"{ok(q['success'] >= 0.8 and q['leakage'] <= 0.1)} |",
             f"| Spearman(DiffEx Delta, oracle Delta) over {len(rows[0]['oracle_all'])} keywords | >= 0.7 | "
             f"{_f(sp)} (mean {_mean(sp)}) | {ok(all(v is not None and v >= 0.7 for v in sp))} |",
             f"| used factors recalled in top-{m['top_k']} | >= 0.8 | mean {_mean(rec)} | "
             f"{ok(bool(rec) and np.mean(rec) >= 0.8)} |",
             f"| true parent in the beam | all | {sum(r['parent_in_beam'] for r in rows)}/{len(rows)} | "
             f"{ok(all(r['parent_in_beam'] for r in rows))} |",
             f"| true child ranks first | all | {sum(r['child_first'] for r in rows)}/{len(rows)} | "
             f"{ok(all(r['child_first'] for r in rows))} |", "",
             "## Per classifier\n", "| classifier:class | planted (label, bias) | used (oracle) | top-k factors | recall | "
             "Spearman | true child (oracle) | DiffEx top | parent in beam |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['classifier']} | {', '.join(p for p in r['planted'] if p)} | {', '.join(r['used'])} | "
                     f"{', '.join(r['top_factors'])} | {_f([r['recall']])} | {_f([r['spearman']])} | {r['true_child']} | "
                     f"{r['diffex_top']} | {r['parent_in_beam']} |")
    tol = [spearman_tied(r["diffex_all"], r["oracle_all"]) for r in rows]
    lines += ["", f"Most oracle Deltas of a classifier that uses one factor are ~0, so the Spearman above also ranks "
              f"noise. Read beside it (not a criterion): with every |Delta| < {TIE} set to 0 on both sides (ties), "
              f"Spearman {_f(tol)} (mean {_mean(tol)}).\n"]
    lines += ["", "## Edit quality per factor (reader)\n",
              "Leaked into: the share of the factor's edits that changed each other factor (an edit may change several).\n",
              "| factor | edits | success | leakage | leaked into |", "|---|---|---|---|---|"]
    lines += [f"| {f} | {v['edits']} | {v['success']:.3f} | {v['leakage']:.3f} | "
              + ", ".join(f"{g} {r:.2f}" for g, r in sorted(v.get("leaked_into", {}).items(), key=lambda gr: -gr[1])
                        if r > 0)
              + " |" for f, v in q["per_factor"].items()]
    lines += ["", "Figures: `diffex_<classifier>.png` (keyword Deltas, DiffEx vs oracle), `diffex_grid.png` (rows: "
              "scenes, then edits to circle, star, red, blue, large, top left, white background; seed 0)."]
    return "\n".join(lines) + "\n"


def _f(xs):
    return ", ".join("n/a" if v is None else f"{v:.2f}" for v in xs)


TIE = 0.01  # |Delta| below which a keyword's Delta reads as 0 in spearman_tied


def spearman_tied(d: dict, o: dict) -> float | None:
    """Spearman of two keyword -> Delta maps with every |Delta| < TIE set to 0 (ties) on both sides."""
    keys = sorted(o)
    z = lambda v: 0.0 if abs(v) < TIE else v  # noqa: E731
    return spearman([z(d[k]) for k in keys], [z(o[k]) for k in keys])


def _mean(xs):
    xs = [v for v in xs if v is not None]
    return f"{np.mean(xs):.2f}" if xs else "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["val", "val-combine", "test", "render"], default="test",
                    help="render: rewrite OUT.md from a test run's OUT.json (no editing)")
    ap.add_argument("--sd", default="shapes-sd")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--hierarchy", default=str(ROOT / "configs" / "explain" / "hierarchy_shapes.yaml"))
    ap.add_argument("--scheduler", default="dpmsolver++", choices=["dpmsolver++", "ddim"])
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--classifiers", nargs="+", default=CLASSIFIERS)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--used-threshold", type=float, default=0.05)
    for k in ("steps", "skip", "edit-guidance-scale", "edit-threshold"):
        ap.add_argument(f"--{k}", type=float, default=None, help="default: chosen on val (OUT_val.json)")
    ap.add_argument("--val-guidance", type=float, nargs="+", default=[5.0, 10.0, 15.0])
    ap.add_argument("--val-threshold", type=float, nargs="+", default=[0.6, 0.75, 0.9])
    ap.add_argument("--val-skip", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--val-steps", type=int, nargs="+", default=[20, 10, 30])
    ap.add_argument("--context", type=int, choices=[0, 1], default=None,
                    help="1: in-context edits (default: chosen on val)")
    ap.add_argument("--val-context", type=int, nargs="+", choices=[0, 1], default=[0, 1])
    ap.add_argument("--combine", choices=["sum", "mean"], default=None,
                    help="how a family's keywords make one edit (default: chosen by --phase val-combine, else sum)")
    ap.add_argument("--val-combine", nargs="+", choices=["sum", "mean"], default=["sum", "mean"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="1: the tiny models run fastest on one thread")
    ap.add_argument("--out", default="benchmarks/results/diffex")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0, c0 = time.time(), time.process_time()
    meta = dict(commit=commit(), command="python " + " ".join(sys.argv), hierarchy=a.hierarchy,
                machine=f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, {a.threads} torch threads, torch {torch.__version__}")
    if a.phase == "render":
        m = json.loads(Path(a.out + ".json").read_text())
        md = report(m).replace("{wall}", f"{m['wall_minutes']} min wall, {m['cpu_minutes']} min CPU (load average at "
                               f"the end {m['load_average']}: the cores were shared)")
        Path(a.out + ".md").write_text(md)
        print(md)
        return
    h, reader = Hierarchy.from_yaml(a.hierarchy), SO.factor_reader(a.weights)
    pipe = load_ledits_pipeline(sd_dir(a), scheduler=a.scheduler)
    if a.phase == "val-combine":
        validate_combine(a, meta, h, pipe, reader)
        return
    if a.phase == "val":
        a.out += "_val"
        md = validate(a, meta, h, pipe, reader)
    else:
        chosen = json.load(open(a.out + "_val.json"))["chosen"] if Path(a.out + "_val.json").exists() else {}
        keys = KEYS
        given = [k for k in keys if getattr(a, k) is not None]
        default = [k for k in DEFAULTS if k not in given and k not in chosen]  # no val choice of them
        for k in default:
            setattr(a, k, DEFAULTS[k])
        for k in set(keys) - set(given) - set(default):
            if k not in chosen:
                ap.error(f"--{k.replace('_', '-')} not given and no {a.out}_val.json: run --phase val first")
            setattr(a, k, chosen[k])
        val = f"{Path(a.out).name}_val.md"
        n_val = len(keys) - len(given) - len(default)
        meta["ledits_source"] = ", ".join(([f"{' '.join(given)} from the command line"] if given else [])
                                          + ([f"{' and '.join(f'{k} {DEFAULTS[k]}' for k in default)} by default"]
                                             if default else [])
                                          + ([f"{'the rest ' if given or default else ''}chosen on val ({val})"]
                                             if n_val else []))
        a.steps, a.context = int(a.steps), bool(a.context)
        md = test(a, meta, h, pipe, reader)
    meta["wall_minutes"] = round((time.time() - t0) / 60, 1)
    meta["cpu_minutes"] = round((time.process_time() - c0) / 60, 1)  # the 2 cores were shared: CPU time says more
    meta["load_average"] = [round(v, 1) for v in os.getloadavg()]
    md = md.replace("{wall}", f"{meta['wall_minutes']} min wall, {meta['cpu_minutes']} min CPU (load average at the end "
                    f"{meta['load_average']}: the cores were shared)")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(meta, f, indent=1, allow_nan=False)
    with open(a.out + ".md", "w") as f:
        f.write(md)
    if a.phase == "test":
        with open(a.out + ".csv", "w", newline="") as f:
            cols = ["classifier", "recall", "spearman", "spearman_abs", "true_child", "diffex_top", "child_first",
                    "parent_in_beam", "oracle_top", "base_score"]
            keys = sorted(meta["rows"][0]["oracle_all"])
            w = csv.writer(f)
            w.writerow(cols + [f"diffex:{k}" for k in keys] + [f"oracle:{k}" for k in keys])
            for r in meta["rows"]:
                w.writerow([r[c] for c in cols] + [round(r["diffex_all"][k], 5) for k in keys]
                           + [round(r["oracle_all"][k], 5) for k in keys])
    print(md)


if __name__ == "__main__":
    main()
