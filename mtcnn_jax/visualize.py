"""Plots for the evaluators: WIDER precision-recall, FDDB ROC and landmark CED curves.

Each function returns the matplotlib Figure (so notebooks display it) and saves it when given a path;
the command line selects the Agg backend itself before calling them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _axes(ax: Any = None, figsize: tuple[float, float] = (6.0, 5.0)):
    """The given axes and its figure, or a new figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def _finish(fig: Any, ax: Any, path: str | Path | None) -> Any:
    """Adds grid and legend, saves when a path is given, returns the figure."""
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left" if ax.get_xlabel() == "Recall" else "lower right")
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_pr_curves(
    curves: Mapping[str, Mapping[str, Any]], path: str | Path | None = None, ax: Any = None
) -> Any:
    """WIDER FACE precision-recall curves, one per setting: {setting: {"precision", "recall", "ap"?}}."""
    fig, ax = _axes(ax)
    for name, c in curves.items():
        label = f"{name} (AP {c['ap']:.3f})" if "ap" in c else name
        ax.plot(np.asarray(c["recall"]), np.asarray(c["precision"]), label=label)
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title="WIDER FACE val")
    return _finish(fig, ax, path)


def plot_roc(
    rocs: Mapping[str, Any], path: str | Path | None = None, ax: Any = None, max_fp: float = 2000
) -> Any:
    """FDDB ROC: true positive rate against false positives, discrete and continuous.

    `rocs` is evaluate_fddb's "roc" ({"fp", "tpr_discrete", "tpr_continuous"}) or {name: such a dict}.
    """
    fig, ax = _axes(ax)
    named = {"": rocs} if "fp" in rocs else rocs
    largest_fp = 0.0
    for name, r in named.items():
        largest_fp = max([largest_fp, *np.asarray(r["fp"], dtype=np.float64)])
        for kind in ("discrete", "continuous"):
            fp, tpr = np.asarray(r["fp"]), np.asarray(r[f"tpr_{kind}"])
            ax.step(
                np.concatenate([[0], fp]),
                np.concatenate([[0], tpr]),
                where="post",
                label=f"{name} {kind}".strip(),
            )
    ax.set(
        xlabel="False positives",
        ylabel="True positive rate",
        xlim=(0, min(max_fp, max(1.05 * largest_fp, 1))),
        ylim=(0, 1.01),
        title="FDDB",
    )
    return _finish(fig, ax, path)


def plot_ced(
    errors: Mapping[str, Any], path: str | Path | None = None, ax: Any = None, max_error: float = 0.2
) -> Any:
    """Cumulative error distribution: fraction of faces with NME <= x, per normalisation or method.

    Missed faces carry an infinite error, so the curves stay below 1 by their share.
    """
    fig, ax = _axes(ax)
    x = np.linspace(0, max_error, 401)
    for name, e in errors.items():
        e = np.sort(np.asarray(e, dtype=np.float64))
        frac = np.searchsorted(e, x, side="right") / max(len(e), 1)
        ax.plot(x, frac, label=name)
    ax.set(
        xlabel="Normalised mean error",
        ylabel="Fraction of faces",
        xlim=(0, max_error),
        ylim=(0, 1.01),
        title="CED",
    )
    return _finish(fig, ax, path)
