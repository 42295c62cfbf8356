"""DEPICT on the shapes world, scored against the renderer oracle (issue 14), with Grad-CAM as baseline.

    python benchmarks/depict.py --phase val      # choose CFG scale and steps on val scenes (effective generation)
    python benchmarks/depict.py                  # test: 11 target classifiers, 200 scenes x 6 concepts x 5 perms

Test phase, on the first ``n`` multi-object test scenes and the 11 multi-object target classifiers
(6 ``primary-*``: label = one concept; 5 ``mixed-*``: a random linear rule over the six):

* DEPICT with the mini SD (``zoo:shapes-multi-sd``): every scene generated from its own caption and
  seed; per concept ``P`` permutations of its column, only changed captions regenerated;
* the oracle: the same protocol with the renderer (``world.permute`` + ``render``);
* Grad-CAM (Captum ``LayerGradCam`` at ``conv3``) pooled over the renderer's concept masks on the
  real scenes;
* what must hold: top-ranked concept = the true driver for >= 5 of 6 primary classifiers; Spearman
  with the oracle ranking >= 0.8 on mixed classifiers; effective-generation gap (detector AUROC real
  vs generated, per concept) <= 0.1; independent-permutation off-diagonal <= 0.05.

Validation phase: the generator's CFG scale and step count are chosen on the first ``n_val`` val
scenes by effective generation alone (the detector's per-concept AUROC on generated vs real scenes:
the smallest worst-concept gap), never by any importance result.
Writes OUT.md, OUT.csv, OUT.json and figures OUT_*.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import commit, cpu_model  # noqa: E402

from featinv.explain import shapes_oracles as SO  # noqa: E402
from featinv.explain.depict import CaptionGenerator, SceneCache, detector_scores, permuted_table, run_depict  # noqa: E402
from featinv.explain.diffex import spearman  # noqa: E402
from featinv.explain.gradcam import gradcam_concept_importance  # noqa: E402
from featinv.explain.plots import importance_boxplot  # noqa: E402
from featinv.specs import build_prior  # noqa: E402
from featinv.viz import comparison_grid, save_png  # noqa: E402
from featinv.zoo.shapes import world as W  # noqa: E402

PRIMARY = [f"primary-{c.replace(' ', '-')}" for c in W.CONCEPTS]
MIXED = [f"mixed-{j}" for j in range(5)]


def prior_with(spec: str, cfg: float):
    return build_prior(spec if "cfg_scale" in spec else f"{spec}{'&' if '?' in spec else '?'}cfg_scale={cfg}")


def validate(a, meta) -> dict:
    """CFG scale x steps on val scenes: worst-concept detector AUROC gap, real vs generated."""
    x, rows = W.load_split("multi", "val", a.n_val)
    p, det = rows["present"], SO.presence_detector(a.weights)
    real = detector_scores(det, x, p)
    out = []
    for cfg in a.val_cfg:
        prior = prior_with(a.prior, cfg)
        for steps in a.val_steps:
            t0 = time.time()
            gen = CaptionGenerator(prior, SO.multi_caption, seed=a.seed, steps=steps, cfg_scale=cfg, batch=a.batch)
            g = gen(p, np.arange(len(p)))
            aur = detector_scores(det, g, p)
            out.append(dict(cfg_scale=cfg, steps=steps, worst_gap=float(np.abs(real - aur).max()),
                            mean_gap=float(np.abs(real - aur).mean()), det_auroc_gen=aur.round(4).tolist(),
                            seconds=round(time.time() - t0, 1)))
            print(out[-1], flush=True)
    best = min(out, key=lambda r: (r["worst_gap"], r["steps"]))
    meta.update(phase="val", n=a.n_val, det_auroc_real=real.round(4).tolist(), grid=out, chosen=best)
    lines = ["# DEPICT generator on validation scenes (choice of CFG scale and steps)\n",
             f"{a.n_val} val scenes, seed {a.seed}; commit `{meta['commit']}`; machine: {meta['machine']}.",
             f"Command: `{meta['command']}`\n", "Criterion: worst-concept |detector AUROC real - generated| "
             "(effective generation), ties to fewer steps. Real-scene detector AUROC: "
             + ", ".join(f"{c} {v:.3f}" for c, v in zip(W.CONCEPTS, real)) + "\n",
             "| cfg_scale | steps | worst gap | mean gap | s |", "|---|---|---|---|---|"]
    lines += [f"| {r['cfg_scale']} | {r['steps']} | {r['worst_gap']:.3f} | {r['mean_gap']:.3f} | {r['seconds']} |"
              for r in out]
    lines += ["", f"Chosen: cfg_scale {best['cfg_scale']}, steps {best['steps']}."]
    return meta, "\n".join(lines) + "\n"


def test(a, meta) -> dict:
    x, rows = W.load_split("multi", "test", a.n)
    p = rows["present"]
    det = SO.presence_detector(a.weights)
    names = [n for n in PRIMARY + MIXED if n in a.classifiers]
    clfs = {n: SO.target_classifier(n, a.weights) for n in names}
    labels = {n: SO.target_labels(n, rows, a.weights) for n in names}
    kw = dict(concept_names=SO.CONCEPTS, detector=det, real_images=x, permutations=a.permutations, seed=a.seed,
              progress=lambda m: print(m, flush=True))
    oracle = run_depict(p, labels, clfs, SO.RendererOracle(rows), **kw)
    print(f"oracle: {oracle.seconds:.0f}s", flush=True)
    prior = prior_with(a.prior, a.cfg)
    cache = SceneCache(CaptionGenerator(prior, SO.multi_caption, seed=a.seed, steps=a.steps, cfg_scale=a.cfg,
                                        batch=a.batch))
    dep = run_depict(p, labels, clfs, None, cache=cache, **kw)
    print(f"depict: {dep.seconds:.0f}s, {dep.images_generated} images generated of {dep.images_requested}", flush=True)
    t0 = time.time()
    masks = SO.concept_masks(rows)
    gcam = {n: gradcam_concept_importance(clfs[n], SO.TARGET_LAYER, x, masks) for n in names}
    gcam_s = time.time() - t0
    rows_out = []
    for n in names:
        truth = SO.target_truth(n, a.weights)
        imp = {"depict": dep.importance[n], "oracle": oracle.importance[n], "gradcam": gcam[n]}
        top = {m: SO.CONCEPTS[int(np.argmax(v))] for m, v in imp.items()}
        r = dict(classifier=n, kind="primary" if n in PRIMARY else "mixed", truth=truth.get("concept") or
                 json.dumps(truth.get("weights")), metric_real=dep.real[n], metric_generated=dep.generated[n])
        for m in imp:
            r[f"top_{m}"] = top[m]
            r[f"hit_{m}"] = int(top[m] == truth["concept"]) if "concept" in truth else None
            r[f"spearman_{m}_oracle"] = spearman(imp[m], imp["oracle"]) if m != "oracle" else 1.0
            r[f"importance_{m}"] = [round(float(v), 4) for v in imp[m]]
        if "weights" in truth:
            w = np.abs([truth["weights"][c] for c in SO.CONCEPTS])
            r["spearman_oracle_abs_weight"] = spearman(imp["oracle"], w)
        rows_out.append(r)
    gap = dep.generation_gap
    res = dict(rows=rows_out, depict=dep.to_dict(), oracle=oracle.to_dict(), gradcam_seconds=round(gcam_s, 1),
               checks=dict(
                   primary_hits_depict=sum(r["hit_depict"] for r in rows_out if r["kind"] == "primary"),
                   primary_hits_oracle=sum(r["hit_oracle"] for r in rows_out if r["kind"] == "primary"),
                   primary_hits_gradcam=sum(r["hit_gradcam"] for r in rows_out if r["kind"] == "primary"),
                   n_primary=sum(r["kind"] == "primary" for r in rows_out),
                   mixed_spearman_depict=[r["spearman_depict_oracle"] for r in rows_out if r["kind"] == "mixed"],
                   mixed_spearman_gradcam=[r["spearman_gradcam_oracle"] for r in rows_out if r["kind"] == "mixed"],
                   generation_gap_max=float(gap.max()), off_diagonal_max=dep.off_diagonal,
                   off_diagonal_mean=float(dep.independence[~np.eye(6, dtype=bool)].mean())))
    meta.update(phase="test", n=a.n, permutations=a.permutations, steps=a.steps, cfg_scale=a.cfg, **res)
    figs(a, dep, oracle, gcam, names, x, p, cache, rows)
    return meta  # main() writes the report: it needs the wall time


def figs(a, dep, oracle, gcam, names, x, p, cache, rows):
    import matplotlib.pyplot as plt

    for n in names[:1] + [m for m in names if m.startswith("mixed")][:1]:
        fig = importance_boxplot(SO.CONCEPTS, {"depict": dep.deltas(n), "oracle": oracle.deltas(n)},
                                 title=f"DEPICT vs oracle: {n}", extra={"grad-cam share": gcam[n]})
        fig.savefig(f"{a.out}_{n}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(dep.independence, cmap="viridis")
    ax.set_xticks(range(6), [c.replace(" ", "\n") for c in SO.CONCEPTS], fontsize=6)
    ax.set_yticks(range(6), SO.CONCEPTS, fontsize=6)
    ax.set_xlabel("detector concept (|delta AUROC|)")
    ax.set_ylabel("permuted concept")
    fig.colorbar(im)
    fig.savefig(f"{a.out}_independence.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    k = 10
    sc = np.arange(k)
    t = permuted_table(p, 0, 0, a.seed)[:k]
    save_png(comparison_grid([x[:k], cache(p[:k], sc), cache(t, sc), SO.RendererOracle(rows)(t, sc)]),
             f"{a.out}_grid.png")


def report(m: dict) -> str:
    c = m["checks"]
    ok = lambda b: "holds" if b else "MISSES"  # noqa: E731
    mixed_ok = all(s is not None and s >= 0.8 for s in c["mixed_spearman_depict"])
    lines = ["# DEPICT on the shapes world vs the renderer oracle\n",
             f"{m['n']} test scenes x 6 concepts x {m['permutations']} permutations, seed {m['seed']}; generator "
             f"`{m['prior']}` with CFG {m['cfg_scale']} and {m['steps']} DDIM steps (chosen on val, depict_val.md); "
             f"commit `{m['commit']}`; machine: {m['machine']}; {m['wall_minutes']} min wall, {m['cpu_minutes']} min CPU "
             f"(load average at the end {m['load_average']}: the cores were shared).",
             f"Command: `{m['command']}`\n",
             f"Generated {m['depict']['images_generated']} images for {m['depict']['images_requested']} requested "
             "(only changed captions, each once). Metric: AUROC of P(class 1) (binary targets).\n",
             "## What must hold\n", "| check | target | measured | |", "|---|---|---|---|",
             f"| top concept = true driver (primary) | >= 5 of 6 | DEPICT {c['primary_hits_depict']}/{c['n_primary']}, "
             f"oracle {c['primary_hits_oracle']}, Grad-CAM {c['primary_hits_gradcam']} | "
             f"{ok(c['primary_hits_depict'] >= 5)} |",
             f"| Spearman with oracle (mixed) | >= 0.8 each | DEPICT {_fmt(c['mixed_spearman_depict'])}; Grad-CAM "
             f"{_fmt(c['mixed_spearman_gradcam'])} | {ok(mixed_ok)} |",
             f"| effective generation: detector AUROC gap | <= 0.1 | max {c['generation_gap_max']:.3f} | "
             f"{ok(c['generation_gap_max'] <= 0.1)} |",
             f"| independent permutation off-diagonal | <= 0.05 | max {c['off_diagonal_max']:.3f}, mean "
             f"{c['off_diagonal_mean']:.3f} | {ok(c['off_diagonal_max'] <= 0.05)} |", "",
             "## Per classifier\n",
             "| classifier | truth | AUROC real | AUROC gen | top DEPICT | top oracle | top Grad-CAM | "
             "rho(DEPICT, oracle) | rho(Grad-CAM, oracle) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
        lines.append(f"| {r['classifier']} | {r['truth'] if r['kind'] == 'primary' else 'linear rule'} | "
                     f"{r['metric_real']:.3f} | {r['metric_generated']:.3f} | {r['top_depict']} | {r['top_oracle']} | "
                     f"{r['top_gradcam']} | {_fmt([r['spearman_depict_oracle']])} | {_fmt([r['spearman_gradcam_oracle']])} |")
    d = m["depict"]
    lines += ["", "## Validity checks\n", "| concept | detector AUROC real | generated | gap | "
              "|delta| own (diagonal) | max off-diagonal in row |", "|---|---|---|---|---|---|"]
    ind = np.asarray(d["independence"])
    for k, cn in enumerate(SO.CONCEPTS):
        off = np.delete(ind[k], k).max()
        lines.append(f"| {cn} | {d['detector_real'][k]:.3f} | {d['detector_generated'][k]:.3f} | "
                     f"{d['generation_gap'][k]:.3f} | {ind[k, k]:.3f} | {off:.3f} |")
    lines += ["", "Importances (mean |delta AUROC| over permutations; Grad-CAM: share of evidence on the concept's mask) "
              "are in the CSV/JSON; figures: `depict_<classifier>.png` (box plots), `depict_independence.png`, "
              "`depict_grid.png` (rows: real, generated, red circle permuted: generated, renderer)."]
    return "\n".join(lines) + "\n"


def _fmt(xs):
    return ", ".join("n/a" if v is None else f"{v:.2f}" for v in xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["val", "test"], default="test")
    ap.add_argument("--prior", default="zoo:shapes-multi-sd")
    ap.add_argument("--weights", default=None, help="folder with the shapes weights (default: the zoo's)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--permutations", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="default: chosen on val (OUT_val.json)")
    ap.add_argument("--cfg", type=float, default=None, help="default: chosen on val (OUT_val.json)")
    ap.add_argument("--val-cfg", type=float, nargs="+", default=[1.5, 3.0, 5.0])
    ap.add_argument("--val-steps", type=int, nargs="+", default=[15, 25])
    ap.add_argument("--classifiers", nargs="+", default=PRIMARY + MIXED)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="1: the tiny models run fastest on one thread")
    ap.add_argument("--out", default="benchmarks/results/depict")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0, c0 = time.time(), time.process_time()
    meta = dict(seed=a.seed, prior=a.prior, commit=commit(), command="python " + " ".join(sys.argv),
                machine=f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} cores, {a.threads} torch threads, torch {torch.__version__}")
    if a.phase == "val":
        a.out += "_val"
        meta, md = validate(a, meta)
    else:
        if a.steps is None or a.cfg is None:
            chosen = json.load(open(a.out + "_val.json"))["chosen"]
            a.steps, a.cfg = a.steps or chosen["steps"], a.cfg or chosen["cfg_scale"]
        meta = test(a, meta)
    meta["wall_minutes"] = round((time.time() - t0) / 60, 1)
    meta["cpu_minutes"] = round((time.process_time() - c0) / 60, 1)  # the 2 cores were shared: CPU time says more
    meta["load_average"] = [round(v, 1) for v in os.getloadavg()]
    if a.phase == "test":
        md = report(meta)
        with open(a.out + ".csv", "w", newline="") as f:
            cols = [k for k in meta["rows"][0] if not k.startswith("importance_")] + [
                f"importance_{m}_{c.replace(' ', '_')}" for m in ("depict", "oracle", "gradcam") for c in SO.CONCEPTS]
            w = csv.writer(f)
            w.writerow(cols)
            for r in meta["rows"]:
                w.writerow([r.get(k) for k in cols[:-18]] + [v for m in ("depict", "oracle", "gradcam")
                                                             for v in r[f"importance_{m}"]])
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(meta, f, indent=1, allow_nan=False)
    with open(a.out + ".md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
