"""Does the shapes prior draw the shape its caption names, or the shape its initial noise leads to?

    HF_HUB_OFFLINE=1 python benchmarks/shapes_prior_shape.py [--n 64] [--seeds 2] [--cfg meta] [--steps 25]

For each of ``--n`` validation rows, captions that differ only in the shape word (square, circle, triangle,
star; every other factor from the row) are generated from the same per-row seeds (``--seeds`` of them), with
DDIM and the CFG scale ``benchmarks/shapes_prior.py`` chose on validation captions (``--cfg meta``, read from
meta.json) or a given one. The reader (never part of the prior) reads each image's shape.

* accuracy per asked shape and the confusion matrix (rows asked, columns read);
* *does the seed decide the shape?* agreement of the read shapes of two different shape words from the same
  seed, against two different words from different seeds (the agreement the confusion matrix alone
  explains): a prior that follows the word gives 0 and 0, one whose noise decides the shape a first number
  well above the second;
* pixel distances: d_word = mean RMS between images of one seed with different shape words, d_seed = the
  same for one word with different seeds; the renderer gives the reference (d_word: one row with another
  shape, same rotation and jitter; d_seed: the same shape at other rotations and jitters).

Writes ``benchmarks/results/shapes_prior_shape.{md,json,png}``.
"""
from __future__ import annotations

import argparse
import itertools
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
from _common import commit  # noqa: E402

from featinv.zoo.shapes import reader as R  # noqa: E402
from featinv.zoo.shapes import sd as S  # noqa: E402
from featinv.zoo.shapes import world as W  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SEED_BASE = 80_000  # per-image seed = SEED_BASE + 1000 * seed index + row index (disjoint from shapes_prior's)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean(dim=(1, 2, 3)).sqrt().mean())


def pair_distances(x: torch.Tensor) -> tuple[float, float]:
    """x (n_rows, n_words, n_seeds, C, H, W) -> (d_word, d_seed)."""
    _, nw, ns = x.shape[:3]
    d_word = np.mean([rms(x[:, i, s], x[:, j, s]) for i, j in itertools.combinations(range(nw), 2) for s in range(ns)])
    d_seed = np.mean([rms(x[:, w, s], x[:, w, t]) for s, t in itertools.combinations(range(ns), 2) for w in range(nw)])
    return float(d_word), float(d_seed)


def read_agreement(shape_read: torch.Tensor) -> tuple[float, float]:
    """shape_read (n_rows, n_words, n_seeds) -> share of pairs of *different* words read as the same shape,
    (from the same seed, from different seeds)."""
    _, nw, ns = shape_read.shape
    pairs = list(itertools.combinations(range(nw), 2))
    same = np.mean([float((shape_read[:, i, s] == shape_read[:, j, s]).float().mean()) for i, j in pairs for s in range(ns)])
    other = np.mean([float((shape_read[:, i, s] == shape_read[:, j, t]).float().mean())
                     for i, j in pairs for s in range(ns) for t in range(ns) if s != t])
    return float(same), float(other)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="validation rows")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per row (>= 2 for d_seed)")
    ap.add_argument("--cfg", default="meta", help="CFG scale, or 'meta' for the one shapes_prior.py chose on val")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", type=Path, default=S.WEIGHTS_DIR)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not (1 <= args.n <= 1000 and 2 <= args.seeds <= 10 and args.steps >= 1):
        ap.error("--n in 1..1000, --seeds in 2..10 and --steps >= 1 are needed (per-image seeds stay distinct)")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    meta = json.loads((args.weights / "meta.json").read_text())
    cfg = float(meta["shapes-sd"]["fidelity"]["caption_single"]["cfg_scale"]) if args.cfg == "meta" else float(args.cfg)
    pipe = S.load_pipeline(S.sd_dir("shapes-sd", args.weights))
    reader = R.load_reader(args.weights)
    _, rows = W.load_split("single", "val", args.n)
    nw = len(W.SHAPES)
    caps, seeds = [], []
    for i, r in enumerate(rows):
        for w in range(nw):
            row = W.edit(r[None], "shape", w)
            for s in range(args.seeds):
                caps.append(W.caption(row[0]))
                seeds.append(SEED_BASE + 1000 * s + i)
    x = S.generate(pipe, caps, seeds=seeds, cfg_scale=cfg, steps=args.steps)
    read, _ = R.read_factors(x, reader)
    shape_read = read["shape"].view(args.n, nw, args.seeds)
    asked = torch.arange(nw).view(1, nw, 1).expand_as(shape_read)
    conf = np.zeros((nw, nw), dtype=int)
    np.add.at(conf, (asked.flatten().numpy(), shape_read.flatten().numpy()), 1)
    same_seed, other_seed = read_agreement(shape_read)
    x = x.view(args.n, nw, args.seeds, *x.shape[1:])
    d_word, d_seed = pair_distances(x)
    # the renderer's reference: the same rows, every shape, seeds -> other rotation and jitter
    rng = np.random.default_rng(0)
    ref = []
    for s in range(args.seeds):
        rr = rows.copy()
        if s > 0:
            rr["angle"] = rng.uniform(0, 2 * np.pi, len(rr))
            rr["dx"], rr["dy"] = (rng.uniform(-W.JITTER, W.JITTER, len(rr)) for _ in range(2))
        ref.append(torch.stack([W.render(W.edit(rr, "shape", w)) for w in range(nw)], 1))
    r_word, r_seed = pair_distances(torch.stack(ref, 2))
    res = dict(cfg_scale=cfg, accuracy_per_asked_shape={s: round(float(conf[k, k] / conf[k].sum()), 4)
                                                        for k, s in enumerate(W.SHAPES)},
               accuracy=round(float(np.trace(conf) / conf.sum()), 4), confusion=conf.tolist(),
               agreement_other_word_same_seed=round(float(same_seed), 4),
               agreement_other_word_other_seed=round(float(other_seed), 4),
               d_word=round(d_word, 4), d_seed=round(d_seed, 4), render_d_word=round(r_word, 4),
               render_d_seed=round(r_seed, 4), wall_seconds=round(time.time() - t0, 1))
    write(res, args, x)
    return res


def write(res: dict, args, x: torch.Tensor) -> None:
    import torchvision

    args.results.mkdir(parents=True, exist_ok=True)
    cmd = "HF_HUB_OFFLINE=1 python benchmarks/shapes_prior_shape.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    res["stamp"] = dict(commit=commit(), command=cmd.strip(), n=args.n, seeds=args.seeds, ddim_steps=args.steps,
                        machine=f"{platform.machine()} CPU, torch threads={torch.get_num_threads()}",
                        torch=torch.__version__, load_average_at_end=os.getloadavg()[0])
    k = min(8, len(x))  # figure: per row (8 rows), the 4 shape words (columns) x seeds
    grid = x[:k].permute(0, 2, 1, 3, 4, 5).reshape(-1, *x.shape[3:])
    grid = torch.nn.functional.interpolate(grid, scale_factor=2, mode="nearest")
    torchvision.utils.save_image(grid, args.results / "shapes_prior_shape.png", nrow=len(W.SHAPES), padding=2,
                                 pad_value=0.5)
    st = res["stamp"]
    lines = ["# Shapes prior: does the shape follow the caption's word or the initial noise?\n",
             f"Commit `{st['commit']}`; command: `{st['command']}`  ",
             f"Machine: {st['machine']} (1-min load average at the end {st['load_average_at_end']:.1f}); torch "
             f"{st['torch']}; {args.n} validation rows x {len(W.SHAPES)} shape words x {args.seeds} seeds (per-image "
             f"seed = {SEED_BASE} + 1000 x seed index + row index); DDIM {args.steps} steps, CFG {res['cfg_scale']} "
             f"(shapes_prior.py's choice on val captions); the reader reads every image. Wall {res['wall_seconds']:.0f} s.\n",
             f"Accuracy (the reader reads the asked shape): **{res['accuracy']:.3f}**; per asked shape: "
             + ", ".join(f"{s} {v:.2f}" for s, v in res["accuracy_per_asked_shape"].items()) + ".\n",
             "| asked \\ read | " + " | ".join(W.SHAPES) + " |", "|---" * (len(W.SHAPES) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(str(v) for v in row) + " |" for s, row in zip(W.SHAPES, res["confusion"])]
    lines += ["", "Two different shape words are read as the same shape in "
              f"**{res['agreement_other_word_same_seed']:.3f}** of the pairs drawn from the same seed, against "
              f"{res['agreement_other_word_other_seed']:.3f} of the pairs from different seeds (a prior that follows the "
              "word: 0 and 0; the difference is the share of the shape that the initial noise, not the word, decides).\n",
              "| RMS pixel distance | generated | renderer |", "|---|---|---|",
              f"| d_word: same seed (same rotation for renders), another shape word | {res['d_word']:.4f} | "
              f"{res['render_d_word']:.4f} |",
              f"| d_seed: same shape word, another seed (another rotation and jitter) | {res['d_seed']:.4f} | "
              f"{res['render_d_seed']:.4f} |",
              f"| d_word / d_seed | {res['d_word'] / res['d_seed']:.2f} | {res['render_d_word'] / res['render_d_seed']:.2f} |",
              "", "![rows: a validation row and a seed; columns: square, circle, triangle, star](shapes_prior_shape.png)",
              "", f"Figure: {min(8, args.n)} rows x {args.seeds} seeds (one line each), the four shape words in columns "
              "(square, circle, triangle, star).\n"]
    (args.results / "shapes_prior_shape.md").write_text("\n".join(lines))
    (args.results / "shapes_prior_shape.json").write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
