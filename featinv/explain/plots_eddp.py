"""Figures of EDDP's layer analysis (matplotlib, imported lazily): the direction x concept IoU heatmap."""
from __future__ import annotations


def iou_heatmap(report, title: str = "", ax=None):
    """IoU of every direction (rows, with its label and RCAV significance) with every concept (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iou = report.iou.numpy()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(0.32 * iou.shape[1] + 3, 0.28 * iou.shape[0] + 1.8))
    im = ax.imshow(iou, vmin=0, vmax=max(0.5, float(iou.max())), cmap="viridis", aspect="auto")
    ax.set_xticks(range(iou.shape[1]), [f"{f}:{v}" for f, v in report.concepts], rotation=90, fontsize=7)
    sig = report.significant("rcav") if "rcav" in report.influence else [False] * iou.shape[0]
    ax.set_yticks(range(iou.shape[0]), [f"{i}{' *' if s else ''} {f}:{v}" for i, ((f, v), s) in
                                        enumerate(zip(report.labels.names, sig))], fontsize=7)
    ax.set_title(f"{title} IoU (* = RCAV-significant)" if title else "IoU (* = RCAV-significant)", fontsize=9)
    (fig or ax.figure).colorbar(im, ax=ax, fraction=0.03)
    if fig is not None:
        fig.tight_layout()
    return fig or ax.figure
