"""EDDP benchmark, part ``shapes`` (run through ``python benchmarks/eddp.py --part shapes``).

Per classifier (default ``zoo:shapes-shape``, ``zoo:shapes-color``), at ``conv3`` (8x8x64):
1. EDDP is fitted on unlabelled *train* renders for every number of directions in ``--directions``; the
   number is chosen on *val* renders by S^2 (the paper's count of distinct concepts, IoU-weighted; ties: S^1).
2. The chosen pairs are labelled on *test* renders (Network Dissection IoU, S^1, S^2), their influence on the
   classes is tested (RCAV, permutation test, Bonferroni, RCAV and paired nulls) and counterfactual moves
   along them are scored; the counterfactual step k is chosen on val (largest mean success - control).
3. Baselines (PCA, FastICA, NMF, SAE with as many components; supervised Pattern-CAV): fitted on the same
   train positions, signs and detection quantiles chosen on val, scored on test like EDDP.
4. AM validation: every direction's projection is maximised with guided diffusion on the empty-prompt
   shapes prior (guidance weight chosen on validation *seeds* of the first classifier's directions from
   ``--weights-grid``), with ``unguided`` (the prior alone: the chance rate) and the AM baselines ``pixel``
   and ``fourier``; the shapes reader checks each direction's label in every image.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch

from featinv.explain import am as AM
from featinv.explain import eddp_shapes as ES
from featinv.explain.baselines import from_pairs
from featinv.explain.concepts import dissect
from featinv.explain.counterfactual import class_targets, coordinate_spread, counterfactuals
from featinv.explain.dissection import s1_score, s2_score
from featinv.explain.eddp import PRESETS, EDDPConfig
from featinv.explain.eddp_world import LayerConfig, fit_directions, score_components
from featinv.explain.layer import to_map
from featinv.explain.layer_baselines import choose, fit_all, position_labels
from featinv.methods import get_method
from featinv.specs import build_encoder, build_prior

GUIDED = dict(steps=25, recurrence=2, early_steps=2, early_recurrence=4)  # NFE 54 (featinv's fast, shorter)
CF_GRID = (1.0, 2.0, 4.0, 8.0)
VAL_AM_SEED = 1000


def eddp_config(args) -> EDDPConfig:
    return EDDPConfig(**{**PRESETS["fast"].__dict__, "epochs_a": args.epochs, "epochs_b": args.epochs // 2,
                         "epochs_d": args.epochs, "restarts_a": 1})


def accuracy(split, X, labels) -> dict:
    with torch.no_grad():
        logits = torch.cat([split.logits(X[i:i + 512]) for i in range(0, len(X), 512)])
    out = {}
    for h, sl in split.head_slices().items():
        out[h] = float((logits[:, sl].argmax(1) == labels[h]).float().mean())
    return out


def analyse_classifier(spec, data, args, log) -> dict:
    train, val, test = data
    cs = ES.concepts()
    split = ES.layer_split(spec, args.layer)
    fit_X, X_val, X_test = (split.activations(d.images) for d in (train, val, test))
    acc = accuracy(split, X_test, test.labels)
    log(f"{spec}: test accuracy {acc}")
    fits, val_scores = {}, {}
    for I in args.directions:
        t = time.perf_counter()
        pairs = fit_directions(split, fit_X, LayerConfig(n_directions=I, eddp=eddp_config(args)), seed=args.seed)
        iou = dissect(to_map(from_pairs(pairs).score(X_val), split.hw), torch.zeros(I), val.masks)
        fits[I], val_scores[I] = (pairs, time.perf_counter() - t), (s2_score(iou), s1_score(iou))
        log(f"{spec}: EDDP I={I} fitted in {fits[I][1]:.0f}s; val S2 {val_scores[I][0]:.3f} S1 {val_scores[I][1]:.3f}")
    I = max(val_scores, key=lambda k: val_scores[k])
    pairs, fit_seconds = fits[I]
    comp = from_pairs(pairs)
    # counterfactual step on val
    from featinv.explain.concepts import label
    lab_val = label(dissect(to_map(comp.score(X_val), split.hw), torch.zeros(I), val.masks), cs.names)
    sigma = coordinate_spread(fit_X, comp.S)
    targets = class_targets(lab_val.names, split.classes())
    cf_val = {}
    for k in CF_GRID:
        cf = counterfactuals(split, X_val, comp.S, targets, k * sigma, seed=args.seed)
        s, c = cf.mean("success"), cf.mean("control")
        cf_val[k] = (s - c) if s is not None else float("-inf")
    cf_k = max(cf_val, key=cf_val.get)
    cfg = LayerConfig(n_directions=I, eddp=eddp_config(args), cf_k=cf_k, influence_images=args.influence_images,
                      influence_on=args.influence_on)
    reports = {"EDDP": score_components(comp, split, X_test, test, cs, cfg, torch.zeros(I), fit_X, args.seed, pairs)}
    log(f"{spec}: chose I={I}, cf_k={cf_k}; EDDP test {reports['EDDP'].summary()}")
    # baselines
    g = torch.Generator().manual_seed(args.seed)
    flat = fit_X.reshape(-1, fit_X.shape[-1])
    sub = torch.randperm(len(flat), generator=g)[: args.baseline_positions]
    plabels = position_labels(train.masks, split.hw)[sub]
    choice = {}
    for bl in fit_all(flat[sub], I, plabels, seed=args.seed, sae_epochs=args.sae_epochs):
        bl, thr, ch = choose(bl, flat, X_val, split.hw, val.masks)
        choice[bl.name] = ch
        bcfg = LayerConfig(n_directions=bl.S.shape[1], cf_k=cf_k, influence_images=args.influence_images,
                           influence_on=args.influence_on)
        reports[bl.name] = score_components(bl, split, X_test, test, cs, bcfg, thr, fit_X, args.seed)
        log(f"{spec}: {bl.name} {reports[bl.name].summary()}")
    return dict(spec=spec, split=split, accuracy=acc, I=I, val_scores=val_scores, cf_val=cf_val, cf_k=cf_k,
                reports=reports, fit_seconds=fit_seconds, choice=choice, X_test=X_test)


def guided(w: float):
    return get_method("fast", name=f"guided-w{w:g}", weight=w, **GUIDED)


def am_rates(split, report, method, prior, reader, dirs, n, seed, dataset, batch):
    res = AM.maximise(method, prior, split.encoder, report.S, dirs, n, seed=seed, dataset=dataset, batch=batch)
    out = AM.read(reader, res.images, [report.labels.names[i] for i in dirs], ES.factors())
    return res, out


def run_am(results, args, log) -> dict:
    prior, reader = build_prior(args.prior), build_encoder(args.reader)
    factors = ES.factors()
    # validation: guidance weight, on the first classifier with directions the reader can check (a label
    # naming a factor value), validation seeds; if no direction anywhere is checkable, on-manifold rate only
    checkable = [(r, [i for i, lab in enumerate(r["reports"]["EDDP"].labels.names) if AM.label_value(lab, factors)])
                 for r in results]
    first, dirs = next(((r, d) for r, d in checkable if d), (results[0], []))
    if not dirs:
        log("AM validation: no direction has a checkable label; choosing the weight by on-manifold rate")
        dirs = list(range(first["reports"]["EDDP"].S.shape[1]))
    dirs = dirs[: args.val_directions]
    rep = first["reports"]["EDDP"]
    val = {}
    for w in args.weights_grid:
        _, out = am_rates(first["split"], rep, guided(w), prior, reader, dirs, args.val_samples, VAL_AM_SEED,
                          f"{first['spec']}-val", args.am_batch)
        val[w] = (AM.rate(out.hit) or 0.0, AM.rate(out.on_manifold) or 0.0)
        log(f"AM validation w={w}: hit {val[w][0]:.3f} on-manifold {val[w][1]:.3f}")
    w = max(val, key=lambda k: val[k])
    methods = [guided(w), get_method("unguided", steps=GUIDED["steps"]), get_method("pixel"), get_method("fourier")]
    am = {"val": val, "weight": w, "val_classifier": first["spec"], "val_n": len(dirs), "per": {}}
    for r in results:
        rep = r["reports"]["EDDP"]
        dirs = list(range(rep.S.shape[1]))
        for m in methods:
            t = time.perf_counter()
            res, out = am_rates(r["split"], rep, m, prior, reader, dirs, args.am_samples, args.seed, r["spec"],
                                args.am_batch)
            am["per"][(r["spec"], m.name)] = dict(images=res.images, hit=out.hit, on=out.on_manifold,
                                                  proj=res.projection, nfe=res.nfe, seconds=time.perf_counter() - t)
            log(f"AM {r['spec']} {m.name}: hit {AM.rate(out.hit)} on-manifold {AM.rate(out.on_manifold):.3f} "
                f"({time.perf_counter() - t:.0f}s)")
    return am


def write_csv(results, am, path: Path) -> None:
    rows = []
    for r in results:
        for name, rep in r["reports"].items():
            for row in rep.rows():
                base = {"classifier": r["spec"], "method": name, **row}
                if name == "EDDP":
                    for (spec, m), a in am["per"].items():
                        if spec == r["spec"]:
                            i = row["direction"]
                            hit = a["hit"][i]
                            base[f"am_hit_{m}"] = None if torch.isnan(hit).all() else float(hit.mean())
                            base[f"am_on_{m}"] = float(a["on"][i].mean())
                rows.append(base)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def figure(results, am, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from featinv.explain.plots_eddp import iou_heatmap

    n = len(results)
    fig = plt.figure(figsize=(22, 7.5 * n))
    for j, r in enumerate(results):
        rep = r["reports"]["EDDP"]
        iou_heatmap(rep, r["spec"], ax=fig.add_subplot(n, 2, 2 * j + 1))
        ax = fig.add_subplot(n, 2, 2 * j + 2)
        names = [m for (s, m) in am["per"] if s == r["spec"]]
        cols = [torch.cat([torch.cat(list(am["per"][(r["spec"], m)]["images"][i][:2]), 2) for m in names], 1)
                for i in range(rep.S.shape[1])]
        per_row = 8
        cols += [torch.ones_like(cols[0])] * (-len(cols) % per_row)       # white padding to full rows
        grid = torch.cat([torch.cat(cols[k:k + per_row], 2) for k in range(0, len(cols), per_row)], 1)
        ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_axis_off()
        ax.set_title(f"{r['spec']}: AM images per direction (2 each); row blocks: {', '.join(names)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _f(v, nd=3):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _sig_labels(rep, test):
    counts = rep.labels.factor_counts(rep.significant(test))
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def markdown(results, am, args, header: str) -> str:
    L = ["## Shapes world", "", header, "",
         f"Layer `{args.layer}` (8x8 positions x 64 channels) of each classifier; EDDP fitted on {args.n_fit} unlabelled "
         f"*train* renders ({args.n_fit * 64} positions), the number of directions I chosen on {args.n_val} *val* "
         f"renders by S^2 (ties S^1) from {list(args.directions)}, everything below scored on {args.n_test} *test* renders. "
         f"EDDP schedule: `fast` with {args.epochs}/{args.epochs // 2}/{args.epochs} epochs for steps (a)/(b)/(d), "
         "one start of (a), full batch; the uncertainty losses run through the classifier's own f+ "
         "(featinv.explain.layer.LayerSplit). Concepts (28): every value of shape, colour, size, position on the "
         "object's pixels, background values on the background's pixels, any/object, any/background; a direction's "
         "label is its best-IoU concept if IoU >= 0.04 (Network Dissection), detections = W^T x - b > 0 upsampled "
         "bilinearly to 32x32. Influence: RCAV step alpha = median coordinate spread of the directions, "
         f"change of the class {args.influence_on} (f+), {args.influence_images} test images, permutation test with 2 I C / 0.05 permutations, p < 0.05 / (I C) "
         "(Bonferroni); one shared null set per test: RCAV null = logistic-regression CAVs of permuted detector labels "
         "(Pfau et al. 2021), pattern null = differences of means of permuted labels (random directions shaped like the "
         "data: stricter), paired null = random signs of the per-image changes. Counterfactual: every position of a test image moved by k sigma_i along s_i; success = "
         "the prediction becomes the class the direction's label names (only directions labelled with a class of the "
         "classifier), control = the same step along random directions; k chosen on val from "
         f"{list(CF_GRID)}.", ""]
    for r in results:
        L.append(f"* `{r['spec']}`: test accuracy {', '.join(f'{h} {v:.3f}' for h, v in r['accuracy'].items())}; val "
                 "S^2 / S^1 per I: " + "; ".join(f"I={k}: {a:.3f} / {b:.3f}" for k, (a, b) in r["val_scores"].items())
                 + f" -> I = {r['I']} (fit {r['fit_seconds']:.0f} s); counterfactual k = {r['cf_k']:g} (val success - "
                 "control: " + ", ".join(f"{k:g}: {_f(v)}" for k, v in r["cf_val"].items()) + ").")
    L += ["", "### Labels and influence (test)", "",
          "| classifier | method | directions | labelled | S^1 | S^2 | SDC / SCDP (RCAV null) | SDC / SCDP (pattern) | "
          "SDC / SCDP (paired) | significant directions' labels (RCAV) | (pattern) | (paired) | counterfactual success / "
          "control (directions) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, rep in r["reports"].items():
            s = rep.summary()
            L.append(f"| {r['spec']} | {name} | {s['n_directions']} | {s['labelled']} | {s['S1']:.3f} | {s['S2']:.3f} | "
                     f"{s.get('SDC_rcav')} / {s.get('SCDP_rcav')} | {s.get('SDC_pattern')} / {s.get('SCDP_pattern')} | "
                     f"{s.get('SDC_paired')} / {s.get('SCDP_paired')} | {_sig_labels(rep, 'rcav')} | "
                     f"{_sig_labels(rep, 'pattern')} | {_sig_labels(rep, 'paired')} | {_f(s['cf_success'])} / "
                     f"{_f(s['cf_control'])} ({s['cf_directions']}) |")
    L += ["", "Baselines: PCA / FastICA / NMF / SAE with I components on the same train positions "
          f"({args.baseline_positions} sampled), signs and detection quantiles chosen on val; Pattern-CAV is supervised "
          "(one logistic probe per concept present in the train positions), detecting at logit > 0. Chosen: "
          + "; ".join(f"{r['spec']} " + ", ".join(f"{k} q={v['quantile']}" for k, v in r["choice"].items())
                      for r in results) + ".", ""]
    L += ["### What must hold: the significant directions of the shape classifier are shape-labelled", ""]
    for r in results:
        rep = r["reports"]["EDDP"]
        for t in ("rcav", "pattern", "paired"):
            sig = rep.significant(t)
            n = sum(sig)
            share = {f: rep.label_share(f, t) for f in ("shape", "color")}
            L.append(f"* `{r['spec']}`, {t} null: {n} of {len(sig)} directions significant; of them shape-labelled "
                     f"{_f(share['shape'])}, colour-labelled {_f(share['color'])} ({_sig_labels(rep, t)}).")
    L += ["", "### Validation by activation maximisation (test seeds)", "",
          f"Objective: maximise (1/P) sum_p s_i^T x_p / ||s_i|| at `{args.layer}` (featinv.objectives.Projection). "
          f"Guided: featinv's `fast` guidance on {GUIDED['steps']} steps (K = {GUIDED['recurrence']}, "
          f"{GUIDED['early_steps']} early steps with K = {GUIDED['early_recurrence']}) on `{args.prior}` (empty prompt); "
          f"weight chosen on validation seeds ({am['val_n']} directions of {am['val_classifier']}, "
          f"{args.val_samples} seeds each) from {list(args.weights_grid)}: "
          + ", ".join(f"w={k:g}: hit {a:.3f}, on-manifold {b:.3f}" for k, (a, b) in am["val"].items())
          + f" -> w = {am['weight']:g}. `unguided` = the prior alone (the chance rate of each label), `pixel` / "
          f"`fourier` = featinv's AM baselines with the same objective. {args.am_samples} images per direction. "
          "Hit = the reader (zoo:shapes-reader) reads the direction's label (checkable labels only: any/* and "
          "unlabelled directions are left out); on-manifold = every factor read with confidence >= 0.9.", "",
          "| classifier | method | hit rate (all checkable) | hit rate (RCAV-significant) | on-manifold | mean projection | NFE | s |",
          "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rep = r["reports"]["EDDP"]
        sig = rep.significant("rcav")
        for (spec, m), a in am["per"].items():
            if spec != r["spec"]:
                continue
            L.append(f"| {spec} | {m} | {_f(AM.rate(a['hit']))} | {_f(AM.rate(a['hit'], sig))} | {_f(AM.rate(a['on']))} | "
                     f"{float(a['proj'].mean()):.3f} | {a['nfe']} | {a['seconds']:.0f} |")
    L += ["", "### Per direction (EDDP, test)", ""]
    for r in results:
        rep = r["reports"]["EDDP"]
        names = [m for (s, m) in am["per"] if s == r["spec"]]
        L += [f"`{r['spec']}`:", "", "| dir | label | IoU | RCAV | pattern | paired | strongest class effect | counterfactual | "
              + " | ".join(f"AM {m}" for m in names) + " |", "|---" * (8 + len(names)) + "|"]
        for row in rep.rows():
            i = row["direction"]
            hits = []
            for m in names:
                h = am["per"][(r["spec"], m)]["hit"][i]
                hits.append("n/a" if torch.isnan(h).all() else f"{float(h.mean()):.2f}")
            cf = "n/a" if row["cf_success"] is None else f"{row['cf_success']:.2f} (ctrl {row['cf_control']:.2f})"
            L.append(f"| {i} | {row['label_factor']}:{row['label_value']} | {row['iou']:.3f} | "
                     f"{'yes' if row['significant_rcav'] else 'no'} | {'yes' if row['significant_pattern'] else 'no'} | "
                     f"{'yes' if row['significant_paired'] else 'no'} | "
                     f"{row['top_class']} {row['top_effect']:+.4f} | {cf} | " + " | ".join(hits) + " |")
        L.append("")
    return "\n".join(L)


def main_shapes(args, log, header: str, out: Path) -> None:
    torch.manual_seed(args.seed)
    cs = ES.concepts()
    data = tuple(ES.world_data(s, n, cs) for s, n in (("train", args.n_fit), ("val", args.n_val), ("test", args.n_test)))
    specs = [c if not args.weights else f"{c}?path={args.weights}" for c in args.classifiers]
    results = [analyse_classifier(s, data, args, log) for s in specs]
    am = run_am(results, args, log)
    write_csv(results, am, out / "eddp_shapes.csv")
    figure(results, am, out / "eddp_shapes.png")
    section = markdown(results, am, args, header)
    md = out / "eddp.md"
    text = md.read_text() if md.exists() else "# EDDP: encoding-decoding direction pairs (seed 001, arXiv 2509.23926)\n"
    head = text.split("## Shapes world")[0].rstrip() + "\n\n"
    md.write_text(head + section + "\n")
    log(f"wrote {md}")
