"""Ground-truth validity of feature inversion in the shapes world (issue 13): what a feature keeps is
what its inversions share; what it drops, they vary in.

    python benchmarks/shapes_validity.py [--n 64] [--seeds 0 1] [--encoders shape color invariant clip]

For every encoder E (``zoo:shapes-<E>``, default feature) and seed, the config
``configs/shapes/invert_<E>.yaml`` runs through the real harness (``featinv predict``): E's feature of
each of the first ``n`` test scenes is inverted with the empty-prompt prior ``zoo:shapes-sd`` by the
guided method(s), and by the ``unguided`` prior (the negative control) and the AM baselines from the
same seeds; the reader (``zoo:shapes-reader``, never used for guidance) reads every output. Per factor k:

* agreement a_k = P[reader_k(output) = reader_k(target)];
* chance c_k = sum_v p_v q_v, p = the targets' histogram of factor k (their true values), q = the reader's
  histogram over the unguided outputs: the agreement of a prior sample drawn independently of its target;
* retention r_k = (a_k - c_k) / (1 - c_k);
* variation: the total-variation distance between the factor's histogram over the outputs and q;
* probe accuracy of (E, k) from ``featinv/zoo/weights/meta.json`` (linear probes on held-out features).

Also the mean feature cosine, the on-manifold rate (every factor read with confidence >= 0.9), and
Spearman(r_k, probe accuracy) over all (encoder, factor) pairs. The mini-CLIP text experiment
(``configs/shapes/text_clip.yaml``): captioned factors' agreement with the prompt, and for the
factors the prompt does not name, retention measured as agreement between two inversions of the
same prompt against chance (and their variation). Writes benchmarks/results/shapes_validity.{md,csv,png}.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import time
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from _common import commit, cpu_model  # noqa: E402

from featinv import results as R  # noqa: E402
from featinv.cli import main as featinv_main  # noqa: E402

FACTORS = ("shape", "color", "size", "position", "background")
ROOT = Path(__file__).resolve().parents[1]


def run(config: str, out: Path, seed: int, overrides: list[str]) -> list[dict]:
    """One ``featinv predict`` into a fresh ``out``: a benchmark recomputes every record (the CLI would resume an
    earlier run's records by fingerprint, and keep methods the new run does not name)."""
    shutil.rmtree(out, ignore_errors=True)
    featinv_main(["predict", "-c", str(ROOT / config), "--output_dir", str(out), "--seed_everything", str(seed),
                  "--wandb.mode", "disabled", "--trainer.enable_progress_bar", "false", *overrides])
    return [r for r in R.latest(R.read_dir(out)).values() if "skipped" not in r]


def hist(records: list[dict], k: str) -> dict[int, float]:
    c = Counter(int(r[f"eval/reader/{k}_value"]) for r in records)
    n = sum(c.values())
    return {v: m / n for v, m in c.items()}


def tv(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(v, 0.0) - q.get(v, 0.0)) for v in set(p) | set(q))


def on_manifold(r: dict) -> bool:
    return all(r[f"eval/reader/{k}_conf"] >= 0.9 for k in FACTORS)


def probes() -> dict[tuple[str, str], float]:
    """(encoder, factor) -> held-out linear-probe accuracy, from the zoo's meta.json."""
    meta = json.loads((ROOT / "featinv" / "zoo" / "weights" / "meta.json").read_text())
    table = meta.get("shapes-probes", {}).get("probes", meta.get("shapes-probes", {}))
    out = {}
    for enc, facs in table.items():
        if isinstance(facs, dict):
            for k, v in facs.items():
                acc = v.get("test_accuracy", v.get("accuracy")) if isinstance(v, dict) else v
                if acc is not None and k in FACTORS:
                    out[(enc.removeprefix("shapes-"), k)] = float(acc)
    return out


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


@lru_cache(maxsize=None)
def _test_split_labels(n: int) -> dict:
    """The true factor values of the first n test scenes of the single-object world (loaded once)."""
    from featinv.zoo.shapes import world as W

    return W.labels(W.load_split("single", "test", n)[1])


def target_hist(records: list[dict], k: str) -> dict[int, float]:
    """The true values of factor k over the records' targets."""
    idx = sorted({int(r["index"]) for r in records})
    lab = _test_split_labels(idx[-1] + 1)[k]
    c = Counter(int(lab[i]) for i in idx)
    return {v: m / len(idx) for v, m in c.items()}


def analyse(records: list[dict], encoder: str, probe: dict) -> list[dict]:
    by = defaultdict(list)
    for r in records:
        by[r["method"]].append(r)
    ung = by.get("unguided")
    if not ung:
        raise SystemExit("the unguided control is missing: it gives the chance level")
    rows = []
    for method, rs in by.items():
        row = dict(encoder=encoder, method=method, n=len(rs), final_cos=sum(r["final_cos"] for r in rs) / len(rs),
                   on_manifold=sum(on_manifold(r) for r in rs) / len(rs))
        for k in FACTORS:
            q, pt = hist(ung, k), target_hist(records, k)
            c = sum(pt.get(v, 0.0) * qv for v, qv in q.items())
            a = sum(r[f"eval/reader/{k}"] for r in rs) / len(rs)
            row[f"a_{k}"], row[f"c_{k}"], row[f"r_{k}"] = a, c, (a - c) / (1 - c)
            row[f"tv_{k}"] = tv(hist(rs, k), q)
            row[f"probe_{k}"] = probe.get((encoder, k))
        rows.append(row)
    return rows


def text_experiment(out_root: Path, seeds: list[int], overrides: list[str]) -> list[dict]:
    """Per prompt: captioned factors' agreement with the prompt; other factors' between-seed retention."""
    from featinv.zoo.shapes import world as W

    recs = []
    for seed in seeds:
        recs += [dict(r, _seed=seed) for r in run("configs/shapes/text_clip.yaml", out_root / f"text-s{seed}", seed,
                                                  overrides)]
    rows = []
    for method in sorted({r["method"] for r in recs}):
        rs = [r for r in recs if r["method"] == method]
        ung = [r for r in recs if r["method"] == "unguided"]
        row = dict(method=method, n=len(rs), final_cos=sum(r["final_cos"] for r in rs) / len(rs))
        for k in FACTORS:
            q = hist(ung, k)
            c = sum(p * p for p in q.values())
            named = [r for r in rs if any(w in r["text"].split() for w in W.FACTORS[k])]
            if named and k in ("shape", "color"):
                a = sum(int(r[f"eval/reader/{k}_value"]) == W.FACTORS[k].index(
                    next(w for w in W.FACTORS[k] if w in r["text"].split())) for r in named) / len(named)
                qv = [q.get(W.FACTORS[k].index(next(w for w in W.FACTORS[k] if w in r["text"].split())), 0.0)
                      for r in named]
                chance = sum(qv) / len(qv)
                row[f"r_{k}"] = (a - chance) / (1 - chance)
                row[f"kind_{k}"] = "captioned"
            else:  # not named: do two inversions of one prompt agree more than chance?
                pairs = defaultdict(list)
                for r in rs:
                    pairs[(r["text"], r["_seed"])].append(int(r[f"eval/reader/{k}_value"]))
                agree = [sum(x == y for i, x in enumerate(v) for y in v[i + 1:]) / max(1, len(v) * (len(v) - 1) / 2)
                         for v in pairs.values()]
                row[f"r_{k}"] = ((sum(agree) / len(agree)) - c) / (1 - c)
                row[f"kind_{k}"] = "not named"
            row[f"tv_{k}"] = tv(hist(rs, k), q)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--encoders", nargs="+", default=["shape", "color", "invariant", "clip"])
    ap.add_argument("--methods", default='["fast", "unguided", "pixel", "fourier"]',
                    help="JSON list for --model.methods")
    ap.add_argument("--work", default="outputs/shapes_validity")
    ap.add_argument("--out", default="benchmarks/results/shapes_validity")
    ap.add_argument("--text-methods", default='["fast", "unguided"]', help="JSON list for the text experiment")
    ap.add_argument("--no-text", action="store_true")
    ap.add_argument("--prior", default="zoo:shapes-sd",
                    help="prior spec for every run (e.g. zoo:shapes-pixel, the pixel-space fallback); the configs' "
                         "guidance weights were chosen on val for zoo:shapes-sd")
    a = ap.parse_args()
    t0 = time.time()
    work = Path(a.work)
    probe = probes()
    rows = []
    for enc in a.encoders:
        recs = []
        for seed in a.seeds:
            recs += run(f"configs/shapes/invert_{enc}.yaml", work / f"{enc}-s{seed}", seed,
                        ["--data.datasets.init_args.limit", str(a.n), "--model.methods", a.methods,
                         "--model.prior", a.prior])
        rows += analyse(recs, enc, probe)
        print(json.dumps([r for r in rows if r["encoder"] == enc], default=str)[:2000], flush=True)
    text = [] if a.no_text else text_experiment(work, a.seeds, ["--model.methods", a.text_methods,
                                                                "--model.prior", a.prior])
    write(rows, text, a, time.time() - t0)


def write(rows: list[dict], text: list[dict], a, wall: float) -> None:
    rhos = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        pairs = [(r[f"r_{k}"], r[f"probe_{k}"]) for r in rows if r["method"] == m for k in FACTORS
                 if r.get(f"probe_{k}") is not None]
        rhos[m] = spearman([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) > 2 else float("nan")
    cmd = (f"python benchmarks/shapes_validity.py --n {a.n} --seeds {' '.join(map(str, a.seeds))} "
           f"--encoders {' '.join(a.encoders)} --methods '{a.methods}' --text-methods '{a.text_methods}'"
           + (f" --prior {a.prior}" if a.prior != "zoo:shapes-sd" else ""))
    lines = ["# Ground-truth validity of inversion in the shapes world\n",
             f"Commit `{commit()}`, `{cmd}`, seeds {a.seeds}, {a.n} test scenes per seed, "
             f"{cpu_model()} ({platform.machine()}) with {os.cpu_count()} CPU cores, wall {wall / 60:.1f} min.",
             f"Prior `{a.prior}` (empty prompt); judge `zoo:shapes-reader` (never guides). r = retention "
             "(1: the factor is kept, 0: chance), TV = total variation of the outputs' factor histogram from the "
             "unguided prior's, probe = held-out linear-probe accuracy of the encoder's feature.\n",
             "Spearman(retention, probe accuracy) over the (encoder, factor) pairs, per method: "
             + ", ".join(f"{m} **{v:.3f}**" for m, v in rhos.items()) + "\n",
             "| encoder | method | n | final cos | on-manifold | " + " | ".join(f"{k}: probe / r / TV" for k in FACTORS)
             + " |", "|---|---|---|---|---|" + "---|" * len(FACTORS)]
    for r in rows:
        cells = []
        for k in FACTORS:
            p = r.get(f"probe_{k}")
            cells.append(f"{'' if p is None else f'{p:.2f}'} / {r[f'r_{k}']:.2f} / {r[f'tv_{k}']:.2f}")
        lines.append(f"| {r['encoder']} | {r['method']} | {r['n']} | {r['final_cos']:.3f} | {r['on_manifold']:.2f} | "
                     + " | ".join(cells) + " |")
    if text:
        lines += ["\n## Mini-CLIP text targets (`configs/shapes/text_clip.yaml`)\n",
                  "Captioned factors: retention of the prompt's value; factors the prompt does not name: retention "
                  "= agreement between inversions of the same prompt against chance (low = they vary), and TV.\n",
                  "| method | n | final cos | " + " | ".join(f"{k}: r / TV" for k in FACTORS) + " |",
                  "|---|---|---|" + "---|" * len(FACTORS)]
        for r in text:
            lines.append(f"| {r['method']} | {r['n']} | {r['final_cos']:.3f} | " + " | ".join(
                f"{r[f'r_{k}']:.2f} ({'named' if r[f'kind_{k}'] == 'captioned' else 'not named'}) / {r[f'tv_{k}']:.2f}"
                for k in FACTORS) + " |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    figure(rows, a.out + ".png")
    print("\n".join(lines))


def figure(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guided = [r for r in rows if r["method"] not in ("unguided", "pixel", "fourier", "deepinversion")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    mat = [[r[f"r_{k}"] for k in FACTORS] for r in guided]
    im = axes[0].imshow(mat, vmin=-0.1, vmax=1, cmap="viridis")
    axes[0].set_xticks(range(len(FACTORS)), FACTORS, rotation=30, ha="right")
    axes[0].set_yticks(range(len(guided)), [f"{r['encoder']} ({r['method']})" for r in guided])
    for i, r in enumerate(guided):
        for j, k in enumerate(FACTORS):
            p = r.get(f"probe_{k}")
            axes[0].text(j, i, f"{r[f'r_{k}']:.2f}" + (f"\n({p:.2f})" if p is not None else ""), ha="center",
                         va="center", fontsize=7, color="w" if r[f"r_{k}"] < 0.6 else "k")
    axes[0].set_title("retention r (probe accuracy)")
    fig.colorbar(im, ax=axes[0])
    for r in rows:
        xs = [r.get(f"probe_{k}") for k in FACTORS]
        ys = [r[f"r_{k}"] for k in FACTORS]
        pts = [(x, y) for x, y in zip(xs, ys) if x is not None]
        if pts:
            axes[1].scatter(*zip(*pts), label=f"{r['encoder']}/{r['method']}", s=18)
    axes[1].set_xlabel("linear-probe accuracy of the feature")
    axes[1].set_ylabel("retention in the inversions")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
