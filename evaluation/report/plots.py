"""The plots: reads metrics and scores; writes the PR curve and score histogram PNGs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluation.isc_metric import TARGET_PRECISION, Metrics


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_pr(curves: Sequence[tuple[str, Metrics]], path: Path) -> None:
    """Precision-recall of the fused run (bold, its P90 point) and of each branch alone."""
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot()
    for i, (name, m) in enumerate(curves):
        recalls = np.concatenate([[0.0], m.curve.recalls])
        first = m.curve.precisions[:1] if len(m.curve.precisions) else np.zeros(1)
        precisions = np.concatenate([first, m.curve.precisions])
        ax.plot(recalls, precisions, drawstyle="steps-pre", linewidth=2.5 if i == 0 else 1.2,
                label=f"{name}: micro-AP {m.micro_ap:.3f}", zorder=3 if i == 0 else 2)
        if i == 0 and m.threshold_at_p90 is not None:
            ax.plot([m.recall_at_p90], [TARGET_PRECISION], "o", color="tab:red", zorder=4,
                    label=f"P90: recall {m.recall_at_p90:.3f} at score "
                          f"{m.threshold_at_p90:.3g}")
    ax.axhline(TARGET_PRECISION, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_histogram(scores: np.ndarray, labels: np.ndarray | None, threshold: float | None,
                   path: Path) -> None:
    """Score histograms: copies and non-copies (with ground truth), else all pairs."""
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    lo, hi = float(scores.min()), float(scores.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    if labels is None:
        ax.hist(scores, bins=bins, color="tab:blue", label="all pairs")
    else:
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, color="tab:orange",
                label=f"non-copies ({int((labels == 0).sum())})")
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, color="tab:green",
                label=f"copies ({int((labels == 1).sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1,
                   label=f"threshold {threshold:.3g}")
    ax.set_yscale("log")
    ax.set(xlabel="score", ylabel="pairs (log scale)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
