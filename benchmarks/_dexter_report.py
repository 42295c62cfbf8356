"""Markdown of benchmarks/dexter.py (tables stamped with commit, command, seeds, machine)."""
from __future__ import annotations

import math

import numpy as np


def _f(x, nd=2):
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{nd}f}"
    return str(x)


def _table(cols, rows):
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_f(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _val_source(val) -> str:
    """The validation commands behind ``val`` (one per seed, then the pooling command)."""
    runs = "; ".join(f"`{m['command']}` (commit `{m['commit']}`, {m['seconds']} s)" for m in val["val_meta"])
    return f"{runs}; pooled by `{val['meta']['command']}`"


def render(rows, val, test_metas, meta, clf_meta, bias_prf) -> str:
    """``rows``: the test runs of every seed (each with its ``seed``); ``test_metas``: each seed's test meta;
    ``meta``: the pooling command's."""
    dex = [r for r in rows if r["mode"] == "dexter"]
    dif = [r for r in rows if r["mode"] == "diffexplainer"]
    seeds_t = [m["seed"] for m in test_metas]
    cfg, guided_weight = test_metas[0]["config"], test_metas[0]["guided_weight"]
    L = ["# DEXTER / DiffExplainer on the shapes world's target classifiers (issue 15)\n",
         f"Test seeds {', '.join(map(str, seeds_t))}, runs pooled by `{meta['command']}` (commit `{meta['commit']}`). "
         "Per seed S: DEXTER's soft prompt, Gumbel draws and fixed noise seeds S..; activation-score samples seeds "
         "10000 + S..; AM baselines and the counterfactual sweep 20000 + S..; restart-selection samples "
         "(select='best') 30000 + S..\n"]
    L += [f"* seed {m['seed']}: `{m['command']}`, commit `{m['commit']}`; machine: {m['machine']}; torch {m['torch']}; "
          f"wall time {m['seconds']} s" + (" (SMOKE: random-init models, plumbing only)" if m.get("smoke") else "")
          + (" (QUICK: 3 optimisation steps)" if m.get("quick") else "")
          + (f"; this seed's file was converted {m['converted']}" if m.get("converted") else "") for m in test_metas]
    L += ["",
         "The language side is a **template grammar**, not language: the masked LM is a 76k-parameter BERT trained "
         "on the shapes world's 2,592 captions and the reporter is a deterministic rule over the shapes reader's "
         "readings (docs/dexter.md). Hyper-parameters were chosen on one validation class per classifier "
         f"({_val_source(val)}); this page reports the two test classes per classifier (disjoint, seeded draw).\n",
         f"Chosen DEXTER config: `{val['chosen']}` = {cfg}; guided AM weight {guided_weight}.\n"]
    # validation table
    seeds = val["seeds"]
    L.append(f"## Validation (one class per classifier; seed{'s' if len(seeds) > 1 else ''} "
             f"{', '.join(map(str, seeds))}{', runs pooled' if len(seeds) > 1 else ''})\n")
    sel = val.get("selection_f1", "sweep_run_f1")  # the F1 in the selection criterion
    sel_rule = sel.split("_")[0]

    def prf(s, r):
        return " / ".join(_f(s.get(f"{r}_run_{k}", float("nan"))) for k in ("precision", "recall", "f1"))

    vc = ["config", "mean activation", "bias P / R / F1 (run, sweep rule)", "bias P / R / F1 (run, contrast rule)",
          "bias P / R (run, frame rule)", "class word (unbiased)", "seconds", f"selection = act + F1 ({sel_rule})"]
    L.append(_table(vc, [[c, s["activation"], prf(s, "sweep"), prf(s, "contrast"),
                          f"{_f(s['run_precision'])} / {_f(s['run_recall'])}", s["class_word"],
                          s["seconds"], s["selection"]] for c, s in val["summary"].items()]))
    L.append("\nSelection per seed: " + "; ".join(
        f"seed {s}: " + ", ".join(f"{c} {v:.3f}" for c, v in sel_s.items())
        for s, sel_s in val["per_seed_selection"].items()) + ".\n")
    rule = val.get("rule", "sweep")  # the counterfactual rule of the criteria (chosen on val; else sweep)
    if "rule_summary" in val:
        L.append(f"\nCounterfactual rule, chosen on the same validation classes with the chosen config "
                 f"(read from the chosen config's runs above; mean activation {val['rule_activation']:.2f}): the higher run-level bias F1.\n")
        L.append(_table(["rule", "bias P / R / F1 (run)", "bias P / R (classifier)"],
                        [[r, f"{_f(x['run_precision'])} / {_f(x['run_recall'])} / {_f(x['run_f1'])}",
                          f"{_f(x['clf_precision'])} / {_f(x['clf_recall'])}"] for r, x in val["rule_summary"].items()]))
        L.append(f"\nChosen: {rule} rule.\n")
    if val.get("guided"):
        L.append("\nGuided AM (25 steps, 32 images per class and seed) success on validation by weight (seed mean): "
                 + ", ".join(f"w={w}: {v:.2f}" for w, v in val["guided"].items()) + "\n")
    # headline
    L.append("\n## Test: what must hold\n")
    if dex:
        act = np.array([r["activation_score"] for r in dex])
        frame = bias_prf(dex)
        prf = bias_prf(dex, rule + "_")
        other = "contrast" if rule == "sweep" else "sweep"
        oprf = bias_prf(dex, other + "_") if other + "_flags" in dex[0] else None
        unb = [r for r in dex if not r["bias_factor"]]
        cw = float(np.mean([r["class_word"] for r in unb])) if unb else float("nan")
        am = {m: float(np.mean([r[f"{m}_success"] for r in dex])) for m in ("pixel", "fourier", "guided")
              if f"{m}_success" in dex[0]}
        amr = {m: float(np.mean([r[f"{m}_reader_class"] for r in dex])) for m in am}
        hold = [["activation score >= 0.8 (mean over runs)", f"{act.mean():.2f}", _f(bool(act.mean() >= 0.8))],
                ["runs with activation score >= 0.8", f"{int((act >= 0.8).sum())}/{len(act)}", ""],
                ["activation score above every AM baseline's success rate",
                 f"{act.mean():.3f} vs " + ", ".join(f"{m} {v:.3f}" for m, v in am.items()),
                 _f(bool(am) and all(act.mean() > v for v in am.values()))],
                [f"bias precision >= 0.75 (classifier level, {rule} rule)", _f(prf["clf_precision"]),
                 _f(prf["clf_precision"] >= 0.75)],
                [f"bias recall >= 0.75 (classifier level, {rule} rule)", _f(prf["clf_recall"]),
                 _f(prf["clf_recall"] >= 0.75)],
                [f"bias precision / recall (run level, {rule} rule)", f"{_f(prf['run_precision'])} / {_f(prf['run_recall'])}",
                 _f(prf["run_precision"] >= 0.75 and prf["run_recall"] >= 0.75)]]
        if oprf is not None:
            hold += [[f"bias precision / recall (classifier level, {other} rule, not chosen)",
                      f"{_f(oprf['clf_precision'])} / {_f(oprf['clf_recall'])}",
                      _f(oprf["clf_precision"] >= 0.75 and oprf["clf_recall"] >= 0.75)]]
        hold += [
                ["bias precision / recall (classifier level, frame rule)",
                 f"{_f(frame['clf_precision'])} / {_f(frame['clf_recall'])}",
                 _f(frame["clf_precision"] >= 0.75 and frame["clf_recall"] >= 0.75)],
                ["class word in DEXTER's prompt (unbiased classifiers)", _f(cw), _f(cw == 1.0)]]
        L.append(_table(["criterion", "measured", "holds"], hold))
        if am:
            paired = []
            for m in am:
                d = np.array([r["activation_score"] - r[f"{m}_success"] for r in dex])
                paired.append(f"{m}: DEXTER higher in {int((d > 0.05).sum())}, lower in {int((d < -0.05).sum())}, "
                              f"within 0.05 in {int((abs(d) <= 0.05).sum())} (mean difference {d.mean():+.3f})")
            L.append("\nPaired by run (DEXTER's activation score against each AM baseline's success on the same "
                     "class and seed; the margin above is this mean difference): " + "; ".join(paired) + ".\n")
        if len(seeds_t) > 1:
            per = []
            for sd in seeds_t:
                rs = [r for r in dex if r["seed"] == sd]
                ru = [r for r in rs if not r["bias_factor"]]
                sp = bias_prf(rs, rule + "_")
                per.append([sd, np.mean([r["activation_score"] for r in rs]),
                             f"{sum(r['activation_score'] >= 0.8 for r in rs)}/{len(rs)}"]
                           + [np.mean([r[f"{m}_success"] for r in rs]) for m in am]
                           + [f"{_f(sp['clf_precision'])} / {_f(sp['clf_recall'])}",
                              np.mean([r["class_word"] for r in ru]) if ru else float("nan")])
            L.append("\nPer test seed (the criteria above pool every seed):\n")
            L.append(_table(["seed", "activation", "runs >= 0.8"] + [f"{m} AM" for m in am]
                            + [f"bias P / R (classifier, {rule})", "class word"], per))
        L.append("\nReader check (the independent shapes reader reads the class value in the images): DEXTER "
                 f"prompt samples {np.mean([r['reader_class'] for r in dex]):.2f}; "
                 + ", ".join(f"{m} AM {v:.2f}" for m, v in amr.items()) + ".\n")
        L.append("Reporter rules (featinv/explain/reporter.py). *Frame rule* (the issue's): a non-class factor "
                 "whose top value's share of the saved frames exceeds its base rate (1 / #values) by >= 0.3. "
                 "*Sweep rule* (counterfactual): the final prompt sampled with each non-class factor's words set to "
                 "each of its values (same seeds), frames = the samples the classifier assigns to the class, base "
                 "rate = the value's share (as read) of all the sweep's samples; the frames of one prompt share its "
                 "words, so the frame rule flags every factor the prompt names. *Contrast rule* (the same sweep): "
                 "the classifier's hit rate per value (as read, values read >= 4 times); flagged if the most and "
                 "least accepted values differ by >= 0.5 (not diluted when the classifier accepts several values).\n")
        L.append(f"Bias counts ({rule} rule): run level TP {prf['run_tp']}, FP {prf['run_fp']}, FN {prf['run_fn']}; "
                 f"classifier level (a factor flagged in >= half of a classifier's runs) TP {prf['clf_tp']}, "
                 f"FP {prf['clf_fp']}, FN {prf['clf_fn']}. Frame rule: run level TP {frame['run_tp']}, "
                 f"FP {frame['run_fp']}, FN {frame['run_fn']}.\n")
        # per run
        L.append("## Test runs (DEXTER)\n")
        if meta.get("grids"):
            L.append("Images (rows: runs; DEXTER prompt samples, frames, pixel / Fourier / guided AM): "
                     + ", ".join(f"[{g}]({g})" for g in meta["grids"]) + ".\n")
        cols = ["seed", "classifier", "class", "bias (truth)", "DEXTER words", "act. score", "reader class", "frames",
                "flags (sweep)", "flags (contrast)", "flags (frames)", "class word", "pixel", "fourier", "guided", "s"]
        L.append(_table(cols, [[r["seed"], r["classifier"], r["class_name"], (f"{r['bias_factor']}={r['bias_value']}"
                                                                    if r["bias_factor"] else "-"),
                                r["words"], r["activation_score"], r["reader_class"], r["n_frames"],
                                r.get("sweep_flags") or "-", r.get("contrast_flags") or "-", r["flags"] or "-",
                                r["class_word"], r.get("pixel_success", float("nan")),
                                r.get("fourier_success", float("nan")), r.get("guided_success", float("nan")),
                                r["seconds"]] for r in dex]))
        if any(r.get("selection") for r in dex):
            L.append("\nRestarts (select=best): each run's hit rate of every restart's words on 16 selection "
                     "samples (seeds 30000+, not the activation score's); chosen = the restart whose words are the "
                     "explanation.\n")
            L.append(_table(["seed", "classifier", "class", "hit rate per restart", "chosen"],
                            [[r["seed"], r["classifier"], r["class_name"], r["selection"], r["chosen_restart"]]
                             for r in dex]))
    if dif:
        L.append("\n## Test runs (DiffExplainer, soft tokens)\n")
        prf = bias_prf(dif)
        L.append(f"Mean activation score of the soft conditioning {np.mean([r['activation_score'] for r in dif]):.2f}, "
                 f"of its nearest-word prompt {np.mean([r['activation_score_words'] for r in dif]):.2f}; bias P/R "
                 f"(classifier level) {_f(prf['clf_precision'])} / {_f(prf['clf_recall'])}.\n")
        cols = ["seed", "classifier", "class", "nearest words", "act. score (soft)", "act. score (words)", "frames",
                "flags"]
        L.append(_table(cols, [[r["seed"], r["classifier"], r["class_name"], r["words"], r["activation_score"],
                                r["activation_score_words"], r["n_frames"], r["flags"] or "-"] for r in dif]))
    if clf_meta:
        L.append("\n## The classifiers (featinv/zoo/weights/meta.json)\n")
        cols = ["classifier", "test acc.", "bias-aligned acc.", "bias-conflicting acc."]
        L.append(_table(cols, [[n, m.get("test_accuracy", float("nan")), m.get("test_accuracy_bias_aligned", "-"),
                                m.get("test_accuracy_bias_conflicting", "-")]
                               for n, m in clf_meta.items() if n.startswith(("biased", "unbiased"))]))
    return "\n".join(L) + "\n"
