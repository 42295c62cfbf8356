"""Which validation digits a presets variant's inversions are misread on (held-out ViT), and what other
variants give on exactly those digits (issue 16: are misreads the target's or the preset's?).

    python benchmarks/presets_fails.py s25-K2 s50-K2 fast-v1 s50-K1 --n 256 --seeds 0,1

Per-target seeds come from the target keys, so a subset of the digits gets the same noise as in the full
run (the outputs can differ in the last bits with the batch size). Variants are ``benchmarks/presets.py``'s grid names. Prints one JSON line per
seed: the first variant's misread digits with their final cosine, and (final cosine, ViT agreement) of
every other variant on them.
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from presets import grid  # noqa: E402

import featinv  # noqa: E402
from featinv.data import DigitsTargets  # noqa: E402
from featinv.evaluators import build_evaluator, evaluate  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+", help="the first is scanned; the others are run on its misreads")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = dict(grid())
    prior = featinv.build_prior("zoo:digits-ddpm")
    enc, ev = featinv.build_encoder("zoo:digits-cnn@penultimate"), build_evaluator("vit=zoo:digits-vit@logits")
    targets = DigitsTargets("val", limit=a.n)

    def run(name, ids, seed):  # {digit: (final cos, ViT agreement)}
        method = featinv.get_method("fast", name=name, **g[name])
        r = featinv.invert(targets.images[ids], prior=prior, encoder=enc, method=method,
                           keys=[(targets.name, i) for i in ids], seed=seed)
        s = evaluate([ev], r.images, targets.images[ids])
        return {i: (round(float(c), 4), float(v)) for i, c, v in zip(ids, r.final_cos, s["eval/vit/agree"])}

    for seed in (int(s) for s in a.seeds.split(",")):
        full = run(a.variants[0], list(range(len(targets.images))), seed)
        fails = [i for i, (_, v) in full.items() if v < 1]
        row = {"seed": seed, "variant": a.variants[0], "misread": {i: full[i][0] for i in fails}}
        for other in a.variants[1:]:
            row[other] = run(other, fails, seed) if fails else {}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
