"""Pictures: detections drawn on images, and the evaluators' curves (WIDER precision-recall, FDDB ROC,
landmark CED).

Matplotlib functions return the Figure (so notebooks display it) and save it when given a path; the
command lines select the Agg backend themselves (annotate.py draws the same marks with PIL, fast, for
the CLI). Pure functions: nothing global is changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from mtcnn_jax.annotate import BOX_COLOUR, LANDMARK_COLOURS, LANDMARK_NAMES, as_arrays


def _axes(ax: Any = None, figsize: tuple[float, float] = (6.0, 5.0)):
    """The given axes and its figure, or a new figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def _save(fig: Any, path: str | Path | None) -> Any:
    """Saves the figure when a path is given (creating its folder) and returns it."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _finish(fig: Any, ax: Any, path: str | Path | None) -> Any:
    """Adds grid and legend, saves when a path is given, returns the figure."""
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left" if ax.get_xlabel() == "Recall" else "lower right")
    return _save(fig, path)


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


def draw_detections(image: Any, detections_or_boxes: Any, scores: Any = None, landmarks: Any = None, *,
                    ax: Any = None, path: str | Path | None = None) -> Any:
    """The image with boxes, score labels and landmark dots, as a matplotlib Figure (saved when given a path)."""
    img = np.asarray(image)
    boxes, scores, landmarks = as_arrays(detections_or_boxes, scores, landmarks)
    h, w = img.shape[:2]
    fig, ax = _axes(ax, figsize=(8.0, 8.0 * h / max(w, 1)))
    ax.imshow(img)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        ax.add_patch(_rectangle(x1, y1, x2 - x1, y2 - y1))
        if scores is not None:
            ax.text(x1, y1, f"{scores[k]:.2f}", color="black", fontsize=8, va="bottom",
                    bbox={"facecolor": BOX_COLOUR, "edgecolor": "none", "pad": 1})
    if landmarks is not None and len(landmarks):
        for j, (name, colour) in enumerate(zip(LANDMARK_NAMES, LANDMARK_COLOURS)):
            ax.scatter(landmarks[:, j, 0], landmarks[:, j, 1], s=12, c=colour, label=name)
        ax.legend(loc="upper right", fontsize=7, markerscale=1.5)
    ax.set_axis_off()
    return _save(fig, path)


def _rectangle(x: float, y: float, w: float, h: float) -> Rectangle:
    """An unfilled box outline in the box colour."""
    return Rectangle((x, y), w, h, fill=False, edgecolor=BOX_COLOUR, linewidth=1.5)
