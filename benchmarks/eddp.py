"""EDDP benchmark: recovering encoding-decoding direction pairs with known ground truth.

    python benchmarks/eddp.py --part synthetic-val [--val-worlds 100 ... 119] [--lambda-grid 0.02 0.05 0.1 0.25]
    python benchmarks/eddp.py --part synthetic --seeds 0 1 2 3 4 [--val-seed 100] [--threads 1] [--lambda L]
                              [--schedule fast] [--paper-schedule-seeds 0]
    python benchmarks/eddp.py --part shapes [--classifiers zoo:shapes-shape zoo:shapes-color] [--weights DIR]
                              [--directions 8 16 32] [--am-samples 4] [--threads 1]

Part ``synthetic`` (the EDDP paper's own experiment, featinv.explain.synthetic): per seed a new world
(random unit S, D), 1000 train + 1000 test images per class, the avg-pool + linear network trained on the
train images; EDDP and the baselines are fitted on the train activations and scored on the test
activations against the ground truth (featinv.explain.recovery): matched IoU, cos(s_hat, s), signal-value
RMSE, cos after matching on cos. Baselines without their own detection threshold (PCA, FastICA, NMF, SAE)
detect at a quantile of their score chosen on ``--val-seed`` (a world not among ``--seeds``). EDDP's
influence on the classes (RCAV test, featinv.explain.influence) is reported as SDC / SCDP.

Part ``synthetic-val``: the weight of EDDP's uncertainty-region losses (lambda_uur = lambda_cur) chosen on
validation worlds (seeds 100-119, none among the reported ``--seeds``): the value under which the most worlds
meet all three targets (worst-concept IoU >= 0.9, signal RMSE <= 0.3, worst cos >= 0.95), ties by the mean
worst cos. Writes eddp_synthetic_val.md / .json; part ``synthetic`` then uses that lambda (``--lambda``
overrides it).

Part ``shapes`` (the shapes world, ``benchmarks/eddp_shapes.py``): EDDP at conv3 of the shapes classifiers,
labelled with the renderer's masks, influence, counterfactuals, baselines, and validation by activation
maximisation with guided diffusion and the AM baselines; see that file.

Writes benchmarks/results/eddp.md (one section per part; running one part keeps the other's section),
eddp_synthetic.csv / .png and eddp_shapes.csv / .png.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import commit, cpu_model  # noqa: E402
from featinv.explain import baselines as B  # noqa: E402
from featinv.explain import synthetic as syn  # noqa: E402
from featinv.explain.dissection import dissection_iou, match  # noqa: E402
from featinv.explain.eddp import PRESETS, fit_eddp  # noqa: E402
from featinv.explain.influence import rcav_influence  # noqa: E402
from featinv.explain.recovery import score_against_truth  # noqa: E402

RESULTS = Path(__file__).parent / "results"
K_BASELINE = 5  # components for PCA / FastICA / NMF: the rank of the signal (3 concepts + 2 distractors)
QUANTILES = [round(q, 3) for q in np.arange(0.5, 0.951, 0.05)] + [2 / 3]
METHODS = ["EDDP", "EDDP (no f+)", "PCA", "FastICA", "NMF", "SAE", "Pattern-CAV"]
METRICS = [("iou_mean", "IoU (mean)", "higher"), ("min_iou", "IoU (worst concept)", "higher"),
           ("cos_mean", "cos(s_hat, s)", "higher"), ("min_cos", "cos (worst)", "higher"),
           ("rmse_mean", "signal RMSE", "lower"), ("rmse_filter_mean", "RMSE, filter only", "lower"),
           ("cos_best_mean", "cos, best match", "higher"), ("seconds", "fit s", "lower")]
TARGETS = {"min_iou": (">=", 0.9), "rmse_mean": ("<=", 0.3), "min_cos": (">=", 0.95)}


N_PER_CLASS = 1000
SAE_EPOCHS = 1000
SAE_GRID = [dict(k=k, l1=l1) for k in (5, 8) for l1 in (0.01, 0.05, 0.2)]  # tuned on the validation seed
SAE = dict(SAE_GRID[1])


def make_data(seed: int, n_per_class: int | None = None):
    n_per_class = n_per_class or N_PER_CLASS
    world = syn.make_world(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    train, test = syn.sample(world, n_per_class, g), syn.sample(world, n_per_class, g)
    net, report = syn.train_network(train, test, seed=seed)
    # reference: the best pooled linear classifier on the true signal values (what the network could reach)
    from sklearn.linear_model import LogisticRegression
    ref = LogisticRegression(C=1e4, max_iter=10000).fit(train.alpha.mean(1).numpy(), train.labels.numpy())
    report["linear_on_true_alpha"] = float(ref.score(test.alpha.mean(1).numpy(), test.labels.numpy()))
    return world, train, test, net, report


def fit_baselines(train, seed: int) -> list[tuple[B.Components, float]]:
    flat = train.X.reshape(-1, train.X.shape[-1])
    out = []
    for fn in (lambda: B.pca(flat, K_BASELINE, seed), lambda: B.fastica(flat, K_BASELINE, seed),
               lambda: B.nmf(flat, K_BASELINE, seed), lambda: B.sparse_autoencoder(flat, SAE["k"], seed, l1=SAE["l1"], epochs=SAE_EPOCHS),
               lambda: B.pattern_cav(flat, train.on.reshape(-1, train.on.shape[-1]), seed)):
        t = time.perf_counter()
        comp = fn()
        out.append((comp, time.perf_counter() - t))
    return out


def score(comp, world, train, test, q):
    return score_against_truth(comp, test.X, test.on, test.alpha, world.S, torch.full((world.dim,), syn.BIAS),
                               train.X.reshape(-1, world.dim), q)


def best_quantile(comp, world, train, test) -> tuple[float, float]:
    scores = {q: score(comp, world, train, test, q)["iou_mean"] for q in QUANTILES}
    q = max(scores, key=scores.get)
    return float(q), scores[q]


def choose_on_validation(val_seed: int, log) -> dict[str, float]:
    """On the validation world: the SAE's (k, l1) from SAE_GRID (best mean matched IoU at its best quantile),
    then per baseline the detection quantile maximising the mean matched IoU."""
    world, train, test, _, _ = make_data(val_seed)
    flat = train.X.reshape(-1, world.dim)
    sae_scores = []
    for cfg in SAE_GRID:
        comp = B.sparse_autoencoder(flat, cfg["k"], val_seed, l1=cfg["l1"], epochs=SAE_EPOCHS)
        sae_scores.append(best_quantile(comp, world, train, test)[1])
        log(f"validation SAE {cfg}: IoU {sae_scores[-1]:.3f}")
    SAE.update(SAE_GRID[int(np.argmax(sae_scores))])
    chosen = {}
    for comp, _ in fit_baselines(train, val_seed):
        if comp.thresholds is None:
            chosen[comp.name] = best_quantile(comp, world, train, test)[0]
    return chosen


def schedule_config(schedule: str, lam: float | None):
    cfg = PRESETS[schedule]
    return cfg if lam is None else dataclasses.replace(cfg, lambda_uur=lam, lambda_cur=lam)


def meets(r: dict) -> bool:
    return all(r[k] >= v if op == ">=" else r[k] <= v for k, (op, v) in TARGETS.items())


def validate_lambda(args, log) -> None:
    """EDDP's uncertainty-loss weight chosen on validation worlds (module docstring)."""
    rows = []
    for seed in args.val_worlds:
        world, train, test, net, _ = make_data(seed)
        for lam in args.lambda_grid:
            t = time.perf_counter()
            pairs = fit_eddp(train.X, net, 3, schedule_config(args.schedule, lam), seed=seed)
            r = score(B.from_pairs(pairs), world, train, test, None)
            rows.append({"world": seed, "lambda": lam, "seconds": round(time.perf_counter() - t, 1),
                         **{k: r[k] for k in TARGETS}, "met": meets(r)})
            log(f"world {seed} lambda {lam}: " + " ".join(f"{k}={r[k]:.3f}" for k in TARGETS))
    summary = {lam: {"met": sum(r["met"] for r in rows if r["lambda"] == lam),
                     "min_cos": float(np.mean([r["min_cos"] for r in rows if r["lambda"] == lam])),
                     "rmse": float(np.median([r["rmse_mean"] for r in rows if r["lambda"] == lam]))}
               for lam in args.lambda_grid}
    chosen = max(args.lambda_grid, key=lambda lam: (summary[lam]["met"], summary[lam]["min_cos"]))
    n = len(args.val_worlds)
    L = ["# EDDP, synthetic world: the uncertainty-loss weight chosen on validation worlds", "",
         f"Commit {commit()}; command `{args.command}`; validation worlds {args.val_worlds[0]}-{args.val_worlds[-1]} "
         f"({n}; the reported seeds are 0-4); {machine(args.threads)}; wall {args.wall() / 60:.1f} min.", "",
         f"Schedule `{args.schedule}` with lambda_uur = lambda_cur = lambda. Criterion, fixed beforehand: the most worlds "
         "meeting all three targets of issue 15 (worst-concept IoU >= 0.9, signal RMSE <= 0.3, worst cos >= 0.95), "
         "ties by the mean worst cos.", "",
         "| lambda | worlds meeting all targets | mean worst cos | median signal RMSE | worlds missing RMSE | missing cos | missing IoU |",
         "|---|---|---|---|---|---|---|"]
    for lam in args.lambda_grid:
        rs = [r for r in rows if r["lambda"] == lam]
        miss = {k: ", ".join(str(r["world"]) for r in rs if not (r[k] >= v if op == ">=" else r[k] <= v)) or "-"
                for k, (op, v) in TARGETS.items()}
        L.append(f"| {lam} | {summary[lam]['met']} / {n} | {summary[lam]['min_cos']:.3f} | {summary[lam]['rmse']:.3f} | "
                 f"{miss['rmse_mean']} | {miss['min_cos']} | {miss['min_iou']} |")
    L += ["", f"Chosen: lambda = {chosen}. Per world and lambda: eddp_synthetic_val.json.", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eddp_synthetic_val.md").write_text("\n".join(L))
    with open(args.out / "eddp_synthetic_val.json", "w") as f:
        json.dump({"commit": commit(), "command": args.command, "schedule": args.schedule, "rows": rows,
                   "summary": summary, "chosen": chosen},
                  f, indent=1, allow_nan=False)
    log(f"wrote {args.out / 'eddp_synthetic_val.md'}: lambda = {chosen}")


def run_seed(seed: int, quantiles: dict, schedule: str, log, lam: float | None = None) -> tuple[list[dict], dict]:
    world, train, test, net, report = make_data(seed)
    rows = []
    t = time.perf_counter()
    pairs = fit_eddp(train.X, net, 3, schedule_config(schedule, lam), seed=seed)
    t_eddp = time.perf_counter() - t
    t = time.perf_counter()
    no_net = fit_eddp(train.X, None, 3, PRESETS[schedule], seed=seed)  # ablation: no uncertainty-region losses
    comps = [(B.from_pairs(pairs), t_eddp), (B.from_pairs(no_net, "EDDP (no f+)"), time.perf_counter() - t)]
    comps += fit_baselines(train, seed)
    for comp, secs in comps:
        r = score(comp, world, train, test, quantiles.get(comp.name))
        rows.append({"seed": seed, "method": comp.name, "schedule": schedule if comp.name.startswith("EDDP") else "",
                     "quantile": quantiles.get(comp.name, ""), "seconds": secs, "net_test_acc": report["test_accuracy"],
                     **{k: v for k, v in r.items() if not isinstance(v, list)},
                     **{f"{k}_{c}": v for k, vals in r.items() if isinstance(vals, list) for c, v in enumerate(vals)}})
        log(f"seed {seed} {comp.name:12s} " + " ".join(f"{k}={rows[-1][k]:.3f}" for k, _, _ in METRICS))
    infl = {t: rcav_influence(pairs, test.X, net, alpha=1.0, n_perm=200, seed=seed, test=t)
            for t in ("rcav", "pattern", "paired")}
    iou = dissection_iou(pairs.detect(test.X) > 0.5, test.on)
    extra = {"pairs": pairs, "world": world, "test": test, "iou": iou, "influence": infl, "net": report}
    return rows, extra


def summarise(rows: list[dict], method: str, key: str) -> tuple[float, float]:
    v = np.array([r[key] for r in rows if r["method"] == method], dtype=float)
    return float(v.mean()), float(v.std())


def figure(rows, extra0, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    x = np.arange(len(METHODS))
    for j, (key, label) in enumerate([("iou_mean", "IoU"), ("cos_mean", "cos(s_hat, s)")]):
        m = [summarise(rows, n, key) for n in METHODS]
        ax[0].bar(x + (j - 0.5) * 0.38, [a for a, _ in m], 0.38, yerr=[s for _, s in m], label=label, capsize=3)
    ax[0].set_xticks(x, METHODS, rotation=30)
    ax[0].axhline(0.95, color="k", lw=0.6, ls="--")
    ax[0].set_ylim(-0.2, 1.05)
    ax[0].legend(loc="lower left")
    ax[0].set_title("matched to concepts (mean ± std over seeds)")
    im = ax[1].imshow(extra0["iou"].numpy(), vmin=0, vmax=1, cmap="viridis")
    for (i, c), v in np.ndenumerate(extra0["iou"].numpy()):
        ax[1].text(c, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax[1].set_xlabel("concept")
    ax[1].set_ylabel("EDDP detector")
    ax[1].set_title(f"EDDP detector-concept IoU (seed {extra0['seed']})")
    fig.colorbar(im, ax=ax[1], fraction=0.046)
    pairs, test, world = extra0["pairs"], extra0["test"], extra0["world"]
    m = match(extra0["iou"])
    a = pairs.signal_values(test.X, torch.full((world.dim,), syn.BIAS)) * pairs.S.norm(dim=0)
    for c in range(3):
        on = test.on[..., c]
        ax[2].scatter(test.alpha[..., c][on], a[..., m[c]][on], s=2, alpha=0.4, label=f"concept {c}")
    ax[2].plot([2.5, 5], [2.5, 5], "k--", lw=0.8)
    ax[2].set_xlabel("true signal value (on-concept positions)")
    ax[2].set_ylabel("EDDP signal value")
    ax[2].legend(markerscale=4)
    ax[2].set_title("signal values")
    for stage, col in zip("abd", ("C0", "C1", "C2")):
        h = pairs.history[stage]
        ax[3].plot([e["epoch"] for e in h], [e["s"] for e in h], color=col, label=f"L^s step ({stage})")
        ax[3].plot([e["epoch"] for e in h], [e["ma"] for e in h], color=col, ls=":", label=f"L^ma ({stage})")
    ax[3].set_xlabel("epoch (per step)")
    ax[3].legend(fontsize=7)
    ax[3].set_title("EDDP losses")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def best_of(rows, key: str, direction: str, methods) -> str:
    means = {m: summarise(rows, m, key)[0] for m in methods}
    m = (max if direction == "higher" else min)(means, key=means.get)
    return f"{m} {means[m]:.3f}"


def fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}" if abs(mean) < 100 else f"{mean:.1f} ± {std:.1f}"


def write_markdown(rows, paper_rows, extras, quantiles, args, wall, command) -> str:
    seeds = sorted({r["seed"] for r in rows})
    cpu = cpu_model()
    acc = [e["net"]["test_accuracy"] for e in extras]
    ref = [e["net"]["linear_on_true_alpha"] for e in extras]
    L = ["# EDDP: encoding-decoding direction pairs (seed 001, arXiv 2509.23926)", "",
         f"Commit {commit()}; command `{command}`; seeds {seeds} (validation seed {args.val_seed}); "
         f"{cpu}, {os.cpu_count()} cores, {args.threads} torch thread(s), shared; torch {torch.__version__}; "
         f"wall {wall / 60:.1f} min.", "",
         "## Synthetic world (the paper's experiment)", "",
         "D = 16, 3 concepts, 2 distractors, random unit directions; alpha ~ U(2.5, 5) on, U(0, 2.5) off; "
         "beta ~ U(0, 5); +10; 2 positions per image; classes (0,1), (0,2), (1,2); "
         f"{N_PER_CLASS} train + {N_PER_CLASS} test images per class; avg-pool + linear network (Adam 0.005, batch 1024): test accuracy "
         f"{np.mean(acc):.3f} ± {np.std(acc):.3f} (the paper reports 99 %; a logistic regression on the pooled "
         f"*true* signal values reaches {np.mean(ref):.3f} ± {np.std(ref):.3f}, so ~92 % is the ceiling of this "
         "generator, see featinv/explain/synthetic.py). Fitted on train activations, scored on test activations. "
         f"EDDP schedule `{args.schedule}`: {schedule_config(args.schedule, args.lam).summary()} (lambda_uur = "
         f"lambda_cur {args.lambda_source}).", "",
         "| method | " + " | ".join(lbl for _, lbl, _ in METRICS) + " |",
         "|---|" + "---|" * len(METRICS)]
    for name in METHODS:
        L.append(f"| {name} | " + " | ".join(fmt(*summarise(rows, name, k)) for k, _, _ in METRICS) + " |")
    for r in paper_rows:
        L.append(f"| EDDP, paper schedule (seed {r['seed']}) | "
                 + " | ".join(f"{r[k]:.3f}" if abs(r[k]) < 100 else f"{r[k]:.1f}" for k, _, _ in METRICS) + " |")
    L += ["", "Best mean per column (all methods / unsupervised only; Pattern-CAV is supervised): " + "; ".join(
        f"{lbl}: {best_of(rows, k, d, METHODS)} / {best_of(rows, k, d, [m for m in METHODS if m != 'Pattern-CAV'])}"
        for k, lbl, d in METRICS[:-1]) + "."]
    L += ["", "Targets (issue 15), EDDP per seed: " + "; ".join(
        f"{name} {op} {v}: " + ", ".join(
            ("met" if (r[k] >= v if op == ">=" else r[k] <= v) else f"MISSED ({r[k]:.3f})")
            for r in rows if r["method"] == "EDDP")
        for k, (op, v) in TARGETS.items() for name in [dict((m[0], m[1]) for m in METRICS)[k]]) + ".", ""]
    L += ["Chosen on the validation seed (by mean matched IoU): baseline detection quantiles "
          + ", ".join(f"{k} {v:.3f}" for k, v in quantiles.items())
          + f"; SAE {SAE['k']} latents, L1 weight {SAE['l1']} (grid: k in 5, 8; L1 in 0.01, 0.05, 0.2; "
          f"{SAE_EPOCHS} epochs). EDDP's `fast` schedule was chosen on validation worlds 100-103 by hand "
          "(see featinv/explain/eddp.py, PRESETS); the weight of its uncertainty losses as stated above.", ""]
    L += ["EDDP influence (featinv.explain.influence; alpha = 1 along the unit signal vector, 200 permutations, "
          "p < 0.05 / 9, Bonferroni over 3 directions x 3 classes), SDC / SCDP per seed: RCAV null (logistic-regression "
          "CAVs of permuted detector labels, Pfau et al. 2021) "
          + ", ".join(f"{e['influence']['rcav'].sdc} / {e['influence']['rcav'].scdp}" for e in extras)
          + "; pattern null (differences of means of permuted labels: random directions shaped like the data) "
          + ", ".join(f"{e['influence']['pattern'].sdc} / {e['influence']['pattern'].scdp}" for e in extras)
          + "; paired null (does the direction change the prediction at all) "
          + ", ".join(f"{e['influence']['paired'].sdc} / {e['influence']['paired'].scdp}" for e in extras) + ".", ""]
    L += ["Definitions: components are matched to concepts by the Hungarian algorithm on the test IoU (both "
          "signs for PCA / FastICA); IoU = dataset-level IoU of the detections with the positions where the "
          "concept is on; cos = cosine of the matched encoding direction with the true one; signal RMSE = "
          "each method's own decoding of the signal value (EDDP: (W^T S)^+ W^T (x - mu) times ||s_i||, mu = the "
          "world's +10 offset; Pattern-CAV: one probe at a time) against the true alpha on the positions where "
          "the concept is on; 'filter only' = w_k^T (x - mu) / w_k^T s_k for every method; 'best match' = "
          "matched on |cos| instead of IoU. PCA / FastICA / NMF use 5 components (the signal's rank); Pattern-CAV is "
          "supervised (it is trained on the concept labels); 'EDDP (no f+)' is the same schedule without the "
          "network, i.e. without the uncertainty-region losses L^uur / L^cur (an ablation). "
          "See featinv/explain/recovery.py.", ""]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["synthetic", "synthetic-val", "shapes"], default="synthetic")
    ap.add_argument("--val-worlds", type=int, nargs="+", default=list(range(100, 120)))
    ap.add_argument("--lambda-grid", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.25])
    ap.add_argument("--lambda", dest="lam", type=float, default=None,
                    help="EDDP's uncertainty-loss weight (default: chosen by --part synthetic-val, else the schedule's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--val-seed", type=int, default=100)
    ap.add_argument("--schedule", choices=sorted(PRESETS), default="fast")
    ap.add_argument("--paper-schedule-seeds", type=int, nargs="*", default=[],
                    help="also run EDDP with the paper's schedule (lr 5e-5, 20,000 epochs per step) on these seeds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-per-class", type=int, default=1000, help="train and test images per class (paper: 1000)")
    ap.add_argument("--sae-epochs", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    sh = ap.add_argument_group("shapes part")
    sh.add_argument("--classifiers", nargs="+", default=["zoo:shapes-shape", "zoo:shapes-color"])
    sh.add_argument("--weights", default=None, help="folder of the classifiers' weights (default: the zoo's)")
    sh.add_argument("--layer", default="conv3")
    sh.add_argument("--directions", type=int, nargs="+", default=[8, 16, 32], help="numbers of directions tried on val")
    sh.add_argument("--epochs", type=int, default=600, help="EDDP epochs of steps (a) and (d); (b) gets half")
    sh.add_argument("--n-fit", type=int, default=300)
    sh.add_argument("--n-val", type=int, default=300)
    sh.add_argument("--n-test", type=int, default=500)
    sh.add_argument("--influence-images", type=int, default=256)
    sh.add_argument("--influence-on", choices=["probabilities", "logits"], default="probabilities",
                    help="what the influence test measures (RCAV: probabilities; saturated classifiers: logits)")
    sh.add_argument("--baseline-positions", type=int, default=8000)
    sh.add_argument("--prior", default="zoo:shapes-sd")
    sh.add_argument("--reader", default="zoo:shapes-reader")
    sh.add_argument("--weights-grid", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="guidance weights tried on val")
    sh.add_argument("--val-directions", type=int, default=8)
    sh.add_argument("--val-samples", type=int, default=2)
    sh.add_argument("--am-samples", type=int, default=4)
    sh.add_argument("--am-batch", type=int, default=32)
    sh.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "shapes":
        return run_shapes(args)
    global N_PER_CLASS, SAE_EPOCHS
    N_PER_CLASS, SAE_EPOCHS = args.n_per_class, args.sae_epochs
    command = "python benchmarks/eddp.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    args.command, args.wall = command, lambda: time.perf_counter() - t0
    if args.part == "synthetic-val":
        return validate_lambda(args, log)
    val_file = args.out / "eddp_synthetic_val.json"
    args.lambda_source = "from the command line" if args.lam is not None else "the schedule's"
    val = json.load(open(val_file)) if args.lam is None and val_file.exists() else {}
    if val.get("schedule", "fast") == args.schedule and "chosen" in val:  # a choice is for its own schedule
        args.lam = float(val["chosen"])
        args.lambda_source = "chosen on validation worlds (eddp_synthetic_val.md)"
    quantiles = choose_on_validation(args.val_seed, log)
    log(f"quantiles {quantiles}; SAE {SAE}")
    rows, extras = [], []
    for seed in args.seeds:
        r, e = run_seed(seed, quantiles, args.schedule, log, args.lam)
        rows += r
        extras.append({**e, "seed": seed})
    paper_rows = []
    for seed in args.paper_schedule_seeds:
        world, train, test, net, _ = make_data(seed)
        t = time.perf_counter()
        pairs = fit_eddp(train.X, net, 3, PRESETS["paper"], seed=seed)
        r = score(B.from_pairs(pairs), world, train, test, None)
        paper_rows.append({"seed": seed, "seconds": time.perf_counter() - t, **r})
        log(f"paper schedule seed {seed}: " + " ".join(f"{k}={paper_rows[-1][k]:.3f}" for k, _, _ in METRICS))
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / "eddp_synthetic.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + ["note"])
        w.writeheader()
        w.writerows(rows)
        for r in paper_rows:
            w.writerow({**{k: v for k, v in r.items() if k in keys}, "method": "EDDP", "schedule": "paper"})
    figure(rows, extras[0], args.out / "eddp_synthetic.png")
    md = write_markdown(rows, paper_rows, extras, quantiles, args, time.perf_counter() - t0, command)
    old = (args.out / "eddp.md").read_text() if (args.out / "eddp.md").exists() else ""
    if "## Shapes world" in old:  # keep the other part's section
        md = md.rstrip() + "\n\n## Shapes world" + old.split("## Shapes world", 1)[1]
    (args.out / "eddp.md").write_text(md)
    log(f"wrote {args.out / 'eddp.md'}")


def machine(threads: int) -> str:
    cpu = cpu_model()
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s), shared; torch {torch.__version__}"


def run_shapes(args) -> None:
    from benchmarks.eddp_shapes import main_shapes

    command = "python benchmarks/eddp.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"Commit {commit()}; command `{command}`; seeds: EDDP / baselines / RCAV / AM {args.seed}, AM validation "
              f"1000; renders: the world's fixed train / val / test splits; {machine(args.threads)}; wall "
              "{WALL} min.")
    main_shapes(args, log, header, args.out)
    md = args.out / "eddp.md"
    md.write_text(md.read_text().replace("{WALL}", f"{(time.perf_counter() - t0) / 60:.1f}"))


if __name__ == "__main__":
    main()
