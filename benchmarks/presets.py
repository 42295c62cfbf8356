"""Presets chosen by measurement (issue 16): cosine and held-out validity against NFE on the digits world.

    python benchmarks/presets.py --phase val  --n 64 --seeds 0      # the grid, on validation digits
    python benchmarks/presets.py --phase test --n 64 --seeds 0,1    # the val Pareto front, on test digits

Same prior (zoo:digits-ddpm), guiding encoder (digits CNN penultimate), evaluator (the held-out
digits ViT, ``vit=zoo:digits-vit@logits``: never guides) and per-target seeds for every variant.
Every variant is the Shirahama et al. guidance (w = 4 rescaled to ||eps||, clamp 3 std,
straight-through decode clamp) on DDIM-ancestral steps; a variant sets *all* of steps, recurrence
K, early window (first e steps at K = ek), weight schedule and ``stop_cos``, so its numbers do not
depend on what the ``fast`` preset currently is.

``--phase val`` runs the grid on the first n validation digits (a fixed stratified subset of the
*train* split) and chooses the preset there: the cheapest variant (mean NFE) whose outputs are all
read as their target's digit by the held-out ViT and whose mean final cosine is within ``--tol``
(0.001) of the previous default ``fast`` preset (fast-v1: 50 steps, K = 4, K = 20 on the first 3,
linear decay, NFE 248). Writes benchmarks/results/presets_val.{md,json}.

``--phase test`` reads presets_val.json and runs, on the first n held-out test digits with every
seed, the val Pareto front (cosine vs NFE), fast-v1 and the chosen variant. Writes
benchmarks/results/presets.{md,json} and the figure presets.png (val grid with its front and the
choice; test front with std over seeds). Nothing is chosen on test.

Results are saved after every variant; ``--resume`` skips variants already in the output JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import commit  # noqa: E402

import featinv  # noqa: E402
from featinv.data import DigitsTargets  # noqa: E402
from featinv.evaluators import build_evaluator, evaluate  # noqa: E402

OLD_FAST = dict(steps=50, recurrence=4, early_steps=3, early_recurrence=20, schedule="linear_decay", stop_cos=None)


def variant(steps, K=1, e=0, ek=1, schedule="linear_decay", stop=None) -> tuple[str, dict]:
    name = f"s{steps}-K{K}" + (f"-e{e}x{ek}" if e else "") + ("" if schedule == "linear_decay" else f"-{schedule}") \
        + (f"-stop{stop}" if stop is not None else "")
    return name, dict(steps=steps, recurrence=K, early_steps=e, early_recurrence=ek, schedule=schedule, stop_cos=stop)


def grid() -> list[tuple[str, dict]]:
    g = [variant(s) for s in (10, 15, 20, 25, 35, 50, 100)]  # no recurrence, linear decay
    g += [variant(s, schedule="constant") for s in (10, 25, 50)]  # constant weight
    g += [variant(s, K=2) for s in (10, 25, 50)] + [variant(s, K=4) for s in (10, 25)]  # recurrence everywhere
    g += [variant(s, e=3, ek=20) for s in (10, 25)]  # early window only
    g += [variant(s, K=4, e=3, ek=20) for s in (25,)]  # recurrence + early window
    g += [variant(50, K=4)]  # fast-v1 without its early window
    g += [variant(50, stop=c) for c in (0.99, 0.995, 0.998)]  # adaptive compute
    g += [variant(100, stop=c) for c in (0.995, 0.998)]
    g.append(("fast-v1", dict(OLD_FAST)))  # the previous default (NFE 248)
    return g


def run_variant(name, kw, targets, seeds, prior, enc, ev) -> dict:
    method = featinv.get_method("fast", name=name, **kw)
    keys = [(targets.name, i) for i in range(len(targets.images))]
    per_seed = []
    for seed in seeds:
        t0 = time.perf_counter()
        r = featinv.invert(targets.images, prior=prior, encoder=enc, method=method, keys=keys, seed=seed)
        wall = time.perf_counter() - t0
        s = evaluate([ev], r.images, targets.images)
        per_seed.append(dict(seed=seed, final_cos=float(r.final_cos.mean()), min_cos=float(r.final_cos.min()),
                             best_cos=float(r.best_cos.mean()), vit_agree=float(s["eval/vit/agree"].mean()),
                             vit_fail=int((s["eval/vit/agree"] < 1).sum()), vit_cos=float(s["eval/vit/cos"].mean()),
                             nfe=float(r.nfe.float().mean()), s_per_image=wall / len(targets.images)))
        print(json.dumps({"name": name, **per_seed[-1]}), flush=True)

    def ms(k):
        v = [p[k] for p in per_seed]
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    row = dict(name=name, config=kw, n=len(targets.images), seeds=list(seeds), per_seed=per_seed)
    for k in ("final_cos", "best_cos", "vit_agree", "vit_cos", "nfe", "s_per_image"):
        row[k], row[k + "_std"] = ms(k)
    row["min_cos"] = min(p["min_cos"] for p in per_seed)
    row["vit_fail"] = sum(p["vit_fail"] for p in per_seed)
    row["valid"] = row["vit_fail"] == 0
    return row


def pareto(rows) -> list[dict]:
    """Rows not dominated in (lower mean NFE, higher mean final cosine)."""
    front = [r for r in rows if not any(o["nfe"] <= r["nfe"] and o["final_cos"] >= r["final_cos"]
                                        and (o["nfe"] < r["nfe"] or o["final_cos"] > r["final_cos"]) for o in rows)]
    return sorted(front, key=lambda r: r["nfe"])


def choose(rows, tol) -> tuple[dict | None, dict]:
    ref = next(r for r in rows if r["name"] == "fast-v1")
    ok = [r for r in rows if r["valid"] and r["final_cos"] >= ref["final_cos"] - tol]
    return (min(ok, key=lambda r: (r["nfe"], -r["final_cos"])) if ok else None), ref


def load_rows(path) -> list[dict]:
    return json.loads(Path(path).read_text())["rows"] if Path(path).exists() else []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=["val", "test"], required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--tol", type=float, default=0.001, help="cosine tolerance vs fast-v1 for the choice (val)")
    ap.add_argument("--only", default=None, help="comma-separated variant names (default: the whole grid)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--load", default="", help="free-text note on the machine's load, copied into the table")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on shared cores)")
    ap.add_argument("--guide", choices=["cnn", "vit"], default="cnn",
                    help="guiding encoder (the other one is the held-out evaluator); vit writes *_vit files")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.results) / (("presets_val" if a.phase == "val" else "presets") + ("_vit" if a.guide == "vit" else ""))
    prior = featinv.build_prior("zoo:digits-ddpm")
    if a.guide == "cnn":
        enc, ev = featinv.build_encoder("zoo:digits-cnn@penultimate"), build_evaluator("vit=zoo:digits-vit@logits")
    else:  # ViT-guided: the CNN is the held-out judge (its scores keep the key names 'vit_*' in the JSON)
        enc, ev = featinv.build_encoder("zoo:digits-vit"), build_evaluator("vit=zoo:digits-cnn@logits")
    g = dict(grid())
    if a.phase == "val":
        todo = list(g.items())
    else:
        val = json.loads((Path(a.results) / "presets_val.json").read_text())
        names = [r["name"] for r in val["front"] + val["valid_front"]] + ["fast-v1", val["chosen"]]
        todo = [(n, g[n]) for n in dict.fromkeys(names)]
    if a.only:
        keep = a.only.split(",")
        todo = [(n, kw) for n, kw in todo if n in keep]
    targets = DigitsTargets("val" if a.phase == "val" else "test", limit=a.n)
    rows = load_rows(str(out) + ".json") if a.resume else []
    done = {r["name"] for r in rows}
    cmd = f"python benchmarks/presets.py --phase {a.phase} --n {a.n} --seeds {a.seeds} --threads {a.threads}" + (
        f" --guide {a.guide}" if a.guide != "cnn" else "") + (
        f" --only {a.only}" if a.only else "")
    for name, kw in todo:
        if name in done:
            continue
        rows.append(run_variant(name, kw, targets, seeds, prior, enc, ev))
        write(a, out, rows, cmd)
    write(a, out, rows, cmd)


def meta(a, cmd) -> dict:
    la = os.getloadavg()
    return dict(split=a.phase, n=a.n, seeds=a.seeds, commit=commit(), command=cmd, torch=torch.__version__,
                machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, {a.threads} torch thread(s)",
                load=a.load or f"shared cores: load average {la[0]:.1f} at the end of the run (nice {os.nice(0)})")


def write(a, out, rows, cmd):
    m = meta(a, cmd)
    front, vfront = pareto(rows), pareto([r for r in rows if r["valid"]])
    doc = {"meta": m, "rows": rows, "front": front, "valid_front": vfront}
    if a.phase == "val" and any(r["name"] == "fast-v1" for r in rows):
        chosen, ref = choose(rows, a.tol)
        doc["chosen"] = chosen["name"] if chosen else None
    Path(str(out) + ".json").write_text(json.dumps(doc, indent=1))
    head = (f"commit {m['commit']}; command `{m['command']}`; seeds {m['seeds']}; {m['machine']}; torch {m['torch']}; "
            f"{m['load']}. s/image is wall time / n under that load (NFE is the machine-independent cost).\n")
    cols = "| variant | steps | K | early | schedule | stop_cos | NFE | final cos | min final cos | best cos | " \
           "ViT agree (fails) | ViT cos | s/image | front (all / valid) |\n|" + "---|" * 14
    lines = []
    for r in sorted(rows, key=lambda r: r["nfe"]):
        c, pm = r["config"], (lambda k: f"{r[k]:.4f}" + (f" ± {r[k + '_std']:.4f}" if len(r["seeds"]) > 1 else ""))
        lines.append(f"| {r['name']} | {c['steps']} | {c['recurrence']} | "
                     f"{str(c['early_steps']) + 'x' + str(c['early_recurrence']) if c['early_steps'] else '-'} | "
                     f"{c['schedule']} | {c['stop_cos'] or '-'} | {r['nfe']:.1f} | {pm('final_cos')} | {r['min_cos']:.4f} | "
                     f"{pm('best_cos')} | {r['vit_agree']:.3f} ({r['vit_fail']}) | {pm('vit_cos')} | "
                     f"{r['s_per_image']:.3f} | {'all' if r in front else ''}{' / ' if r in front and r in vfront else ''}"
                     f"{'**valid**' if r in vfront else ''} |")
    if a.phase == "val":
        title = f"# Presets on the validation digits (choice), {a.n} val digits\n"
        tail = ""
        if "chosen" in doc:
            tail = (f"\nRule: cheapest (mean NFE) variant with every output read as its target by the held-out ViT and "
                    f"mean final cosine >= fast-v1's {ref['final_cos']:.4f} - {a.tol}. **Chosen: {doc['chosen']}**.\n")
    else:
        title = f"# Presets on held-out test digits ({a.n} test digits, seeds {a.seeds}; choices made on val)\n"
        tail = ("\nmean ± std over seeds of the per-seed means; min final cos and ViT fails over all seeds' "
                "inversions. Variants: the val Pareto fronts (over all variants, and over the valid ones: no "
                "held-out ViT misreading on val), the previous default fast-v1 and the val choice.\n")
    text = title + "\n" + head + "\n" + cols + "\n" + "\n".join(lines) + "\n" + tail
    Path(str(out) + ".md").write_text(text)
    print(text, flush=True)
    if a.guide == "vit":
        text = text.replace("ViT agree", "held-out CNN agree").replace("ViT cos", "held-out CNN cos").replace(
            "# Presets", "# ViT-guided presets (the digits CNN is the held-out judge)")
        Path(str(out) + ".md").write_text(text)
    if a.phase == "test" and a.guide == "cnn":
        plot(Path(a.results) / "presets_val.json", rows, Path(a.results) / "presets.png")


def plot(val_path, test_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = json.loads(Path(val_path).read_text())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, rows, title in ((axes[0], val["rows"], f"val ({val['meta']['n']} digits, seed "
                             f"{val['meta']['seeds']}): grid, fronts, choice"),
                            (axes[1], test_rows, f"test ({test_rows[0]['n']} digits, seeds "
                             f"{','.join(map(str, test_rows[0]['seeds']))}): mean ± std over seeds")):
        front, vfront = pareto(rows), pareto([r for r in rows if r["valid"]])
        for r in sorted(rows, key=lambda r: r["nfe"]):
            stop = r["config"]["stop_cos"] is not None
            ax.errorbar(r["nfe"], r["final_cos"], yerr=r.get("final_cos_std") or None, fmt="s" if stop else "o",
                        ms=5, color=("C2" if stop else "C0") if r["valid"] else "C3", mfc="none" if not r["valid"] else None,
                        capsize=2)
            if r in front or r in vfront or stop or r["name"] in (val.get("chosen"), "fast-v1"):
                ax.annotate(r["name"], (r["nfe"], r["final_cos"]), fontsize=5.5, xytext=(3, 2),
                            textcoords="offset points")
        ax.plot([r["nfe"] for r in front], [r["final_cos"] for r in front], ":", color="0.5", lw=1, zorder=0,
                label="Pareto front, all variants")
        ax.plot([r["nfe"] for r in vfront], [r["final_cos"] for r in vfront], "-", color="C0", lw=1.2, zorder=0,
                label="Pareto front, valid variants")
        for r in rows:
            if r["name"] == val.get("chosen"):
                ax.scatter(r["nfe"], r["final_cos"], marker="*", s=250, color="gold", edgecolor="k", zorder=5,
                           label=f"chosen `fast`: {r['name']}")
            if r["name"] == "fast-v1":
                ax.scatter(r["nfe"], r["final_cos"], marker="D", s=60, facecolor="none", edgecolor="k", zorder=5,
                           label="previous `fast` (fast-v1)")
        ax.set_xscale("log")
        ax.set_xlabel("NFE per image (mean; prior evaluations)")
        ax.set_ylabel("mean final cosine (digits CNN penultimate)")
        lo = min(r["final_cos"] for r in rows)
        if lo < 0.984:
            ax.text(0.02, 0.02, f"below: {', '.join(r['name'] for r in rows if r['final_cos'] < 0.984)}",
                    transform=ax.transAxes, fontsize=5.5)
        ax.set_ylim(0.984, 1.0005)
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("Guided inversion on digits: cosine vs NFE (o fixed steps, □ stop_cos; red hollow: "
                 "held-out ViT misreads >= 1 output)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


if __name__ == "__main__":
    main()
