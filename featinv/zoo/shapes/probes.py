"""Linear probes: which captioned factors each shapes encoder's default feature keeps (measured).

For every (encoder, factor): features of ``n_train`` train renders fit a standardised multinomial
``LogisticRegression`` for each C in ``CS``; the C with the best accuracy on ``n_val`` validation
renders is kept and its accuracy on ``n_test`` test renders is reported, with chance = the test
share of the most frequent value. ``kept``: test accuracy >= 0.95; ``dropped``: within 0.1 of chance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featinv.zoo.shapes import world as W

CS = (0.01, 0.1, 1.0, 10.0)
PROBED = ("shapes-shape", "shapes-color", "shapes-invariant", "shapes-clip")


@torch.no_grad()
def features(encoder, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    return torch.cat([encoder(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


def probe(ftr, ytr, fva, yva, fte, yte, seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for c in CS:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
        clf.fit(ftr, ytr)
        va = clf.score(fva, yva)
        if best is None or va > best[0]:
            best = (va, c, clf)
    va, c, clf = best
    te = float(clf.score(fte, yte))
    chance = float(np.bincount(yte).max() / len(yte))
    return dict(test_accuracy=round(te, 4), val_accuracy=round(float(va), 4), C=c, chance=round(chance, 4),
                kept=te >= 0.95, dropped=te <= chance + 0.1)


def run_probes(out: Path, *, seed: int, n_train: int, n_val: int, n_test: int, encoders=PROBED) -> dict:
    from featinv.zoo.shapes import load_encoder

    data = {s: W.load_split("single", s, n) for s, n in (("train", n_train), ("val", n_val), ("test", n_test))}
    labels = {s: {k: v.numpy() for k, v in W.labels(r).items()} for s, (_, r) in data.items()}
    table = {}
    for name in encoders:
        enc = load_encoder(name, root=out)
        feats = {s: features(enc, x) for s, (x, _) in data.items()}
        table[name] = {"layer": enc.name, "dim": int(feats["train"].shape[1])}
        for f in W.FACTORS:
            table[name][f] = probe(feats["train"], labels["train"][f], feats["val"], labels["val"][f],
                                   feats["test"], labels["test"][f], seed)
            print(f"[shapes-probes] {name} {f}: {table[name][f]['test_accuracy']:.3f} "
                  f"(chance {table[name][f]['chance']:.3f})", flush=True)
    return dict(method="StandardScaler + LogisticRegression(multinomial, lbfgs); C chosen on val from "
                       f"{list(CS)}; test accuracy reported", seed=seed,
                data=dict(train=n_train, val=n_val, test=n_test, mode="single"), probes=table)
