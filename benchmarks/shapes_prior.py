"""Fidelity of the shapes world's miniature Stable Diffusion, judged by the world's readers.

    HF_HUB_OFFLINE=1 python benchmarks/shapes_prior.py [--n 512] [--n-val 256] [--seed 0] [--steps 25]

* VAE: reconstructions (posterior mean) of ``--n`` test renders; reader accuracy per factor and "all
  factors right" (target >= 0.97 each); multi-object renders: detector accuracy per concept.
* Caption-conditioned generation (``shapes-sd``): captions of validation rows pick the CFG scale from
  ``--cfg-grid`` (highest mean per-factor accuracy), then captions of ``--n`` *test* rows are generated
  with that scale and read back: per-factor accuracy (target >= 0.90, position >= 0.80).
* Empty prompt (CFG off: the unconditional prior inversion uses): ``--n`` samples; per-factor reader
  histograms vs the data's factor marginals (test rows): total variation (target <= 0.1); share of
  samples the reader reads with confidence >= 0.9 on every factor (on-manifold rate).
* Multi-object (``shapes-multi-sd``): CFG chosen on validation captions the same way (mean per-concept
  accuracy), then test captions: per-concept presence accuracy and AUROC of the detector's probability
  against the captioned presence, and the share of images whose whole presence row is right.

Sampling: DDIM (``--steps`` steps, eta 0) from per-image seeds, one generator per image. Writes
``benchmarks/results/shapes_prior.{md,csv}``, a grid ``shapes_prior_grid.png`` and (unless
``--no-meta``) the numbers into ``featinv/zoo/weights/meta.json`` under ``fidelity``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import commit, cpu_model  # noqa: E402

from featinv.zoo.shapes import reader as R  # noqa: E402
from featinv.zoo.shapes import sd as S  # noqa: E402
from featinv.zoo.shapes.sd import generate  # noqa: E402
from featinv.zoo.shapes import world as W  # noqa: E402
from featinv.zoo.shapes.train_sd import reconstruct  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED_BASE = {"val": 10_000, "test": 20_000, "empty": 30_000, "multi-val": 40_000, "multi-test": 50_000,
             "multi-empty": 60_000, "grid": 70_000}


def seeds(kind: str, n: int, seed: int) -> list[int]:
    return [SEED_BASE[kind] + 1_000_000 * seed + i for i in range(n)]


def tv(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def single_acc(images, rows, reader) -> dict:
    return R.factor_accuracy(reader, images, rows)


def multi_scores(images, rows, detector) -> dict:
    from sklearn.metrics import roc_auc_score

    p = R.read_presence(images, detector)
    t = W.labels(rows)["presence"]
    res = {c: dict(accuracy=round(float(((p[:, k] > 0.5) == t[:, k]).float().mean()), 4),
                   auroc=round(float(roc_auc_score(t[:, k].numpy(), p[:, k].numpy())), 4)
                   if 0 < t[:, k].sum() < len(t) else None) for k, c in enumerate(W.CONCEPTS)}
    res["all"] = round(float(((p > 0.5) == t).all(1).float().mean()), 4)
    res["mean_accuracy"] = round(float(np.mean([res[c]["accuracy"] for c in W.CONCEPTS])), 4)
    return res


def caption_fidelity(pipe, reader, rv, rt, scales: list[float], seed: int, steps: int) -> tuple[dict, torch.Tensor]:
    """The CFG scale with the highest mean per-factor accuracy on the validation captions ``rv``, then the test
    captions ``rt`` generated with it and read back; also the shape read back per asked shape."""
    sel = {}
    for s in scales:
        img = generate(pipe, W.captions(rv), seeds=seeds("val", len(rv), seed), cfg_scale=s, steps=steps)
        sel[s] = single_acc(img, rv, reader)
        print(f"val cfg {s}: {sel[s]}", flush=True)
    best = max(scales, key=lambda s: np.mean([sel[s][f] for f in W.FACTORS]))
    t0 = time.time()
    gen_t = generate(pipe, W.captions(rt), seeds=seeds("test", len(rt), seed), cfg_scale=best, steps=steps)
    sec_per_img = (time.time() - t0) / len(rt)
    res = dict(cfg_scale=best, selection_on_val={str(k): v for k, v in sel.items()}, test=single_acc(gen_t, rt, reader),
               test_shape_by_asked_shape=shape_by_asked(gen_t, rt, reader), seconds_per_image=round(sec_per_img, 4))
    print("test:", res["test"], flush=True)
    return res, gen_t


def shape_by_asked(images, rows, reader) -> dict:
    """Share of the images whose shape the reader reads as the one asked (rows' shape), per asked shape."""
    read = R.read_factors(images, reader)[0]["shape"].numpy()
    asked = W.labels(rows)["shape"].numpy()
    return {name: round(float((read[asked == k] == k).mean()), 4) if (asked == k).any() else None
            for k, name in enumerate(W.FACTORS["shape"])}


def empty_fidelity(pipe, reader, rt, n: int, seed: int, steps: int) -> tuple[dict, torch.Tensor]:
    """``n`` empty-prompt samples (CFG off) and their ``empty_stats`` against the test rows ``rt``."""
    gen_e = generate(pipe, [""] * n, seeds=seeds("empty", n, seed), cfg_scale=1.0, steps=steps)
    return empty_stats(gen_e, reader, rt), gen_e


def empty_stats(images, reader, rt) -> dict:
    """Per-factor reader histograms of empty-prompt samples, their total variation from the test rows' factor
    marginals, and the share read with confidence >= 0.9 on every factor."""
    vals, conf = R.read_factors(images, reader)
    truth = W.labels(rt)
    res = {f: dict(tv=round(tv(np.bincount(vals[f].numpy(), minlength=len(v)).astype(float),
                               np.bincount(truth[f].numpy(), minlength=len(v)).astype(float)), 4),
                   histogram=np.bincount(vals[f].numpy(), minlength=len(v)).tolist())
           for f, v in W.FACTORS.items()}
    res["confident_rate"] = round(float(torch.stack([conf[f] >= 0.9 for f in W.FACTORS]).all(0).float().mean()), 4)
    res["data_histograms"] = {f: np.bincount(truth[f].numpy(), minlength=len(v)).tolist() for f, v in W.FACTORS.items()}
    return res


def fidelity_parser(description: str) -> argparse.ArgumentParser:
    """The options of the fidelity protocol (also ``shapes_prior_pixel.py``'s)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--n-val", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg-grid", default="1.5,2,3,4,6")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", type=Path, default=S.WEIGHTS_DIR)
    ap.add_argument("--no-meta", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the tables (default benchmarks/results)")
    return ap


def main(argv=None) -> dict:
    args = fidelity_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    grid_scales = [float(s) for s in args.cfg_grid.split(",")]
    reader, detector = R.load_reader(args.weights), R.load_detector(args.weights)
    res: dict = {}

    # -- VAE ------------------------------------------------------------------------------------
    pipe = S.load_pipeline(S.sd_dir("shapes-sd", args.weights))
    xt, rt = W.load_split("single", "test", args.n)
    xm, rm = W.load_split("multi", "test", args.n)
    res["reader_on_test_renders"] = single_acc(xt, rt, reader)
    res["detector_on_test_renders"] = multi_scores(xm, rm, detector)
    res["vae_reconstruction"] = single_acc(reconstruct(pipe.vae, xt), rt, reader)
    mpipe = S.load_pipeline(S.sd_dir("shapes-multi-sd", args.weights))  # its own VAE: shapes-vae's decoder
    res["vae_reconstruction_multi"] = multi_scores(reconstruct(mpipe.vae, xm), rm, detector)

    # -- caption-conditioned and empty prompt, single -------------------------------------------------
    _, rv = W.load_split("single", "val", args.n_val)
    res["caption_single"], gen_t = caption_fidelity(pipe, reader, rv, rt, grid_scales, args.seed, args.steps)
    res["empty_prompt"], gen_e = empty_fidelity(pipe, reader, rt, args.n, args.seed, args.steps)

    # -- multi-object -----------------------------------------------------------------------------
    xmv, rmv = W.load_split("multi", "val", args.n_val)
    msel = {}
    for s in grid_scales:
        img = generate(mpipe, W.captions(rmv), seeds=seeds("multi-val", len(rmv), args.seed), cfg_scale=s,
                         steps=args.steps)
        msel[s] = multi_scores(img, rmv, detector)
        print(f"multi val cfg {s}: {msel[s]['mean_accuracy']} all {msel[s]['all']}", flush=True)
    mbest = max(grid_scales, key=lambda s: msel[s]["mean_accuracy"])
    gen_m = generate(mpipe, W.captions(rm), seeds=seeds("multi-test", len(rm), args.seed), cfg_scale=mbest,
                       steps=args.steps)
    res["caption_multi"] = dict(cfg_scale=mbest, selection_on_val={str(k): v["mean_accuracy"] for k, v in msel.items()},
                                test=multi_scores(gen_m, rm, detector))
    gen_me = generate(mpipe, [""] * args.n, seeds=seeds("multi-empty", args.n, args.seed), cfg_scale=1.0,
                        steps=args.steps)
    cnt = (R.read_presence(gen_me, detector) > 0.5).sum(1).clamp(max=6)
    res["empty_prompt_multi"] = dict(object_count_histogram=np.bincount(cnt.numpy(), minlength=7).tolist(),
                                     data_object_count_histogram=np.bincount(rm["present"].sum(1), minlength=7).tolist())
    res["wall_seconds"] = round(time.time() - t_start, 1)
    write(res, args, gen_t, rt, gen_e, gen_m, rm)
    return res


def write(res, args, gen_t, rt, gen_e, gen_m, rm) -> None:
    import torchvision

    args.results.mkdir(parents=True, exist_ok=True)
    cmd = "HF_HUB_OFFLINE=1 python benchmarks/shapes_prior.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stamp = dict(commit=commit(), command=cmd.strip(), seed=args.seed, n=args.n, n_val=args.n_val, ddim_steps=args.steps,
                 machine=f"{cpu_model()} ({platform.machine()}), torch threads={torch.get_num_threads()}",
                 torch=torch.__version__, load_average_at_end=os.getloadavg()[0])
    res["stamp"] = stamp
    up = lambda a: torch.nn.functional.interpolate(a[:16], scale_factor=2, mode="nearest")  # noqa: E731
    grid = torch.cat([up(gen_t), up(gen_e), up(gen_m)])
    torchvision.utils.save_image(grid, args.results / "shapes_prior_grid.png", nrow=16, padding=2, pad_value=0.5)
    (args.results / "shapes_prior_grid.txt").write_text(
        "row 1: test captions (left to right):\n" + "\n".join(W.captions(rt[:16])) + "\nrow 2: empty prompt\n"
        "row 3: multi-object test captions:\n" + "\n".join(W.captions(rm[:16])) + "\n")
    cs, es, cm = res["caption_single"], res["empty_prompt"], res["caption_multi"]
    F_ = list(W.FACTORS)
    rows = [("reader on test renders", *[res["reader_on_test_renders"][f] for f in F_], res["reader_on_test_renders"]["all"]),
            ("VAE reconstructions (>= 0.97)", *[res["vae_reconstruction"][f] for f in F_], res["vae_reconstruction"]["all"]),
            (f"generated from test captions, CFG {cs['cfg_scale']} (>= 0.90; position >= 0.80)",
             *[cs["test"][f] for f in F_], cs["test"]["all"])]
    lines = ["# Shapes world prior: fidelity judged by the readers\n",
             f"Commit `{stamp['commit']}`; command: `{stamp['command']}`  ",
             f"Machine: {stamp['machine']} (1-min load average at the end {stamp['load_average_at_end']:.1f}); "
             f"torch {stamp['torch']}; seeds: benchmark seed {args.seed} (per-image seeds = base + index).  ",
             f"Sampler: DDIM {args.steps} steps, eta 0; CFG scale chosen on {args.n_val} validation captions from "
             f"{args.cfg_grid} and reported on {args.n} test captions. Wall time {res['wall_seconds']:.0f} s; "
             f"{cs['seconds_per_image']:.3f} s per image with CFG.\n",
             "## Single object (`zoo:shapes-sd`)\n",
             "| images | " + " | ".join(F_) + " | all factors |", "|---" * (len(F_) + 2) + "|"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    lines += ["", "CFG selection on validation (mean accuracy per factor): " + ", ".join(
        f"{k}: {np.mean([v[f] for f in F_]):.3f}" for k, v in cs["selection_on_val"].items()) + "  ",
        "Test captions, shape read back per asked shape: " + ", ".join(
            f"{k} {v}" for k, v in cs["test_shape_by_asked_shape"].items()), "",
        f"Empty prompt ({args.n} samples, CFG off): total variation of reader histograms vs the data's factor "
        f"marginals (<= 0.1); {es['confident_rate']:.3f} of samples read with confidence >= 0.9 on every factor.\n",
        "| factor | TV | sample histogram | data histogram |", "|---|---|---|---|"]
    lines += [f"| {f} | {es[f]['tv']} | {es[f]['histogram']} | {es['data_histograms'][f]} |" for f in F_]
    lines += ["", f"## Multi object (`zoo:shapes-multi-sd`), CFG {cm['cfg_scale']}\n",
              "| images | " + " | ".join(W.CONCEPTS) + " | whole row right |", "|---" * 8 + "|"]
    for label, r in (("detector on test renders", res["detector_on_test_renders"]),
                     ("VAE reconstructions", res["vae_reconstruction_multi"]),
                     ("generated from test captions", cm["test"])):
        lines.append(f"| {label} (accuracy / AUROC) | " + " | ".join(
            f"{r[c]['accuracy']} / {r[c]['auroc']}" for c in W.CONCEPTS) + f" | {r['all']} |")
    lines += ["", f"CFG selection on validation (mean per-concept accuracy): {cm['selection_on_val']}  ",
              f"Empty prompt: object-count histogram (0..6) of samples {res['empty_prompt_multi']['object_count_histogram']}"
              f" vs data {res['empty_prompt_multi']['data_object_count_histogram']}.\n",
              "![samples](shapes_prior_grid.png)\n",
              "Rows: test captions (single), empty prompt, multi-object test captions; captions in "
              "`shapes_prior_grid.txt`.\n"]
    (args.results / "shapes_prior.md").write_text("\n".join(lines))
    with open(args.results / "shapes_prior.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["images", *F_, "all"])
        for r in rows:
            w.writerow(r)
    (args.results / "shapes_prior.json").write_text(json.dumps(res, indent=1) + "\n")
    if not args.no_meta:
        path = args.weights / "meta.json"
        meta = json.loads(path.read_text())
        meta.setdefault("shapes-sd", {})["fidelity"] = dict(
            caption_single=cs, empty_prompt=es, vae_reconstruction=res["vae_reconstruction"], stamp=stamp)
        meta.setdefault("shapes-multi-sd", {})["fidelity"] = dict(caption_multi=cm, stamp=stamp,
                                                                  empty_prompt=res["empty_prompt_multi"])
        path.write_text(json.dumps(dict(sorted(meta.items())), indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
