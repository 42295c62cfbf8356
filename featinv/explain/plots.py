"""Figures of the explainers: DEPICT's importance box plots, DiffEx's keyword Deltas (matplotlib, Agg)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["importance_boxplot", "keyword_bars"]


def _figure(w: float, h: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(w, h))


def importance_boxplot(concepts: Sequence[str], deltas: Mapping[str, np.ndarray], title: str = "",
                       extra: Mapping[str, np.ndarray] | None = None):
    """One box per concept and source (``deltas``: source -> (C, P) |delta metric| per permutation, e.g.
    DEPICT and the renderer oracle); ``extra``: source -> (C,) points (e.g. a Grad-CAM share)."""
    fig, ax = _figure(1.2 + 1.3 * len(concepts), 3.2)
    names = list(deltas)
    width = 0.8 / max(len(names), 1)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for s, name in enumerate(names):
        d = np.asarray(deltas[name], dtype=float)
        pos = np.arange(len(concepts)) + (s - (len(names) - 1) / 2) * width
        bp = ax.boxplot(list(d), positions=pos, widths=width * 0.9, patch_artist=True, manage_ticks=False)
        for patch in bp["boxes"]:
            patch.set_facecolor(colours[s % 4])
            patch.set_alpha(0.5)
        ax.plot([], [], color=colours[s % 4], lw=6, alpha=0.5, label=name)
    for s, (name, v) in enumerate((extra or {}).items()):
        ax.plot(np.arange(len(concepts)), np.asarray(v, dtype=float), "k" + "x+."[s % 3], label=name)
    ax.set_xticks(np.arange(len(concepts)))
    ax.set_xticklabels(concepts, rotation=20, fontsize=8)
    ax.set_ylabel("|metric(gen) - metric(permuted)|")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def keyword_bars(deltas: Mapping[str, Mapping[str, float]], title: str = ""):
    """Grouped bars of signed keyword Deltas per source (e.g. DiffEx and the oracle)."""
    names = list(deltas)
    keys = sorted({k for d in deltas.values() for k in d})
    fig, ax = _figure(1.5 + 0.35 * len(keys), 3.2)
    width = 0.8 / max(len(names), 1)
    for s, name in enumerate(names):
        ax.bar(np.arange(len(keys)) + (s - (len(names) - 1) / 2) * width,
               [deltas[name].get(k, np.nan) for k in keys], width, label=name)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(np.arange(len(keys)))
    ax.set_xticklabels([k.rsplit("/", 1)[-1] for k in keys], rotation=60, fontsize=7)
    ax.set_ylabel("Delta score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
