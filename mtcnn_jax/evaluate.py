"""Benchmark evaluators that follow the official protocols: WIDER FACE, FDDB and 5-point landmarks.

The command line over wider_eval, fddb_eval and landmark_eval: it reads a detections JSON
(detections_json), prints the numbers, and writes them as JSON and the curves as a PNG.
Run `python -m mtcnn_jax.evaluate -h`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.backend_bases import FigureCanvasBase

from mtcnn_jax import cli, visualize
from mtcnn_jax.detections_json import load_detections
from mtcnn_jax.fddb_eval import evaluate_fddb
from mtcnn_jax.landmark_eval import evaluate_landmarks, read_landmark_list
from mtcnn_jax.wider_eval import WIDER_SETTINGS, evaluate_wider

PROG = "python -m mtcnn_jax.evaluate"
WIDER_GT_FILES = ("wider_face_val.mat", *(f"wider_{s}_val.mat" for s in WIDER_SETTINGS))


def _write_json(path: str | None, summary: dict) -> None:
    """Writes the summary numbers (no arrays) as JSON when a path is given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")


def _save_plot(plot_fn: Callable[..., Any], data: Any, path: str | None) -> None:
    """Saves a figure with the non-interactive Agg backend (the CLI needs no display).

    Chosen here, only when a plot is asked for, and not at import: importing this module leaves a
    notebook's inline backend alone.
    """
    if not path:
        return
    matplotlib.use("Agg")
    plt.close(plot_fn(data, path=path))


def _cmd_wider(args: argparse.Namespace) -> None:
    """The `wider` subcommand: prints AP per setting, writes --json and --plot."""
    res = evaluate_wider(load_detections(args.pred), args.gt_dir)
    summary = {s: res[s] for s in WIDER_SETTINGS} | {"images": res["images"]}
    print(f"WIDER FACE val, {res['images']} of {res['split_images']} images")
    for s in WIDER_SETTINGS:
        print(f"  {s:<6} AP {res[s]:.4f}")
    _write_json(args.json, summary)
    curves = {s: res["curves"][s] | {"ap": res[s]} for s in WIDER_SETTINGS}
    _save_plot(visualize.plot_pr_curves, curves, args.plot)


def _cmd_fddb(args: argparse.Namespace) -> None:
    """The `fddb` subcommand: prints TPR at 1000 / 2000 false positives, writes --json and --plot."""
    res = evaluate_fddb(load_detections(args.pred), args.folds)
    summary = {k: v for k, v in res.items() if k != "roc"}
    print(f"FDDB, {res['images']} of {res['split_images']} images, {res['faces']} faces")
    for n in (1000, 2000):
        print(
            f"  TPR at {n} FP: discrete {res[f'discrete_tpr_at_{n}fp']:.4f}, "
            f"continuous {res[f'continuous_tpr_at_{n}fp']:.4f}"
        )
    _write_json(args.json, summary)
    _save_plot(visualize.plot_roc, res["roc"], args.plot)


def _cmd_landmarks(args: argparse.Namespace) -> None:
    """The `landmarks` subcommand: prints NME and failure rates, writes --json and --plot (CED)."""
    entries = read_landmark_list(args.list, args.format, args.bbox_list)
    res = evaluate_landmarks(load_detections(args.pred), entries, root=args.root)
    summary = {k: res[k] for k in ("images", "faces", "missed")}
    print(
        f"Landmarks, {res['images']} images, {res['faces']} faces, "
        f"{res['missed']} missed (counted as failures)"
    )
    for norm in ("inter_ocular", "box_diagonal"):
        r = res[norm]
        summary[norm] = {k: r[k] for k in ("nme", "per_point", "failure_rate")}
        points = " ".join(f"{e:.4f}" for e in r["per_point"])
        print(f"  {norm:<12} NME {r['nme']:.4f}  per point {points}  failure@0.1 {r['failure_rate']:.4f}")
    _write_json(args.json, summary)
    _save_plot(visualize.plot_ced, {n: res[n]["errors"] for n in ("inter_ocular", "box_diagonal")}, args.plot)


def build_parser() -> argparse.ArgumentParser:
    """argparse with one subcommand per benchmark."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wider", help="WIDER FACE val AP (official protocol)")
    p.add_argument("--pred", required=True, help="detections JSON")
    p.add_argument(
        "--gt-dir", required=True, help="folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat"
    )
    p.set_defaults(run=_cmd_wider)
    p = sub.add_parser("fddb", help="FDDB discrete / continuous ROC")
    p.add_argument("--pred", required=True, help="detections JSON")
    p.add_argument("--folds", required=True, help="folder with FDDB-fold-XX-ellipseList.txt")
    p.set_defaults(run=_cmd_fddb)
    p = sub.add_parser("landmarks", help="5-point normalised mean error")
    p.add_argument("--pred", required=True, help="detections JSON with landmarks")
    p.add_argument("--list", required=True, help="LFW+Net list or list_landmarks_celeba.txt")
    p.add_argument("--root", required=True, help="folder the list paths are relative to")
    p.add_argument("--format", choices=("lfw", "celeba"), default="lfw")
    p.add_argument("--bbox-list", help="list_bbox_celeba.txt (celeba format)")
    p.set_defaults(run=_cmd_landmarks)
    for p in sub.choices.values():
        p.add_argument("--json", help="write the numbers here")
        p.add_argument("--plot", help="save the curves here (PNG)")
    return parser


def check_paths(args: argparse.Namespace) -> None:
    """CliError unless every input of the subcommand is there (the benchmark's files included) and the
    --json and --plot targets can be written: checked before any detection is read."""
    cli.existing_file(args.pred, "--pred")
    if args.command == "wider":
        gt_dir = cli.existing_dir(args.gt_dir, "--gt-dir")
        missing = [name for name in WIDER_GT_FILES if not (gt_dir / name).is_file()]
        if missing:
            raise cli.CliError(f"--gt-dir {gt_dir}: no {', '.join(missing)} (the WIDER FACE val ground truth)")
    elif args.command == "fddb":
        folds = cli.existing_dir(args.folds, "--folds")
        if not any(folds.glob("FDDB-fold-*-ellipseList.txt")):
            raise cli.CliError(f"--folds {folds}: no FDDB-fold-XX-ellipseList.txt files")
    else:
        cli.existing_file(args.list, "--list")
        cli.existing_dir(args.root, "--root")
        if args.format == "celeba" and not args.bbox_list:
            raise cli.CliError("--format celeba needs --bbox-list (list_bbox_celeba.txt) to match faces")
        if args.bbox_list:
            cli.existing_file(args.bbox_list, "--bbox-list")
    if args.json:
        cli.output_file(args.json, "--json")
    if args.plot:
        plot = cli.output_file(args.plot, "--plot")
        kinds = FigureCanvasBase.get_supported_filetypes()
        if plot.suffix and plot.suffix[1:].lower() not in kinds:
            raise cli.CliError(f"--plot {plot}: matplotlib cannot write {plot.suffix} files (use .png, .pdf or .svg)")


@cli.entry(PROG)
def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand once its paths are checked; bad input becomes one `error:` line and exit code 2."""
    args = build_parser().parse_args(argv)
    check_paths(args)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
