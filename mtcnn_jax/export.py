"""The detector exported for deployment: one bucket's whole cascade as a `jax.export` artifact that runs
where this package is not installed (issue 27, item 3).

    python -m mtcnn_jax.export --bucket HxW --batch B --out DIR [--platforms cpu,cuda] [--weights W] [--onnx]

The exported function is `deployed_fn(weights, plan, images_BxHxWx3, sizes_Bx2)`: it computes each image's
pyramid plan inside the graph (`traced_image_plan`: level sizes and level counts looked up in per-side tables
made here with `pyramid.level_sizes` and `pyramid.pyramid_scales`, resampling taps from `pyramid.level_taps`
on jax arrays) and runs `cascade.cascade_fn`, so the loader only decodes and pads images. The weights and the
bucket's constants are arguments, saved beside it (as constants they would slow its compilation, and one
program serves any weights of the same shapes). DIR holds:

    cascade.jax     the serialized program (StableHLO for every platform asked for; `jax.export.deserialize`)
    weights.npz     the param tree, flattened to "pnet/conv1/conv/kernel"-style names
    plan.npz        the bucket's constants: P-Net cells (`PyramidPlan.cells`) and the per-side tables
    manifest.json   bucket, batch, platforms, config, where the weights came from, versions
    run.py          `python run.py IMAGE...`: the detect CLI's JSON, with jax, numpy and pillow only
    README.txt      what is there and how to run it
    pnet.onnx ...   with --onnx: the three nets alone (`onnx_nets`)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtcnn_jax import __version__, cli, compiled, export_runner
from mtcnn_jax.cascade import cascade_fn
from mtcnn_jax.checkpoint_integrity import named_arrays
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.detect import resolve_params
from mtcnn_jax.pyramid import PyramidPlan, level_sizes, level_taps, pyramid_scales
from mtcnn_jax.stages import INPUT_SIZE, STAGES

PROG = "python -m mtcnn_jax.export"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
FILES = export_runner.FILES  # the artifact's file names: one source for the writer and the loader
ONNX_FILES = tuple(f"{stage}.onnx" for stage in STAGES)
MAX_SIDE = 8192  # a bucket side beyond any image the detector is meant for (the ladder ends at 4096)


# ------------------------------------------------------------------------------------ the exported graph


def plan_constants(bucket_hw: tuple[int, int], config: CascadeConfig) -> dict[str, np.ndarray]:
    """The bucket's constants the exported cascade reads: its P-Net cells (`PyramidPlan.cells`) and two
    per-side tables over sides 0..max(bucket): "level_side" (n, L), side n's level side ceil(n * s) for each
    of the bucket's scales (`level_sizes`: the two sides of a level are computed alike), and
    "levels_used" (n,), how many levels an image whose shorter side is n uses (`pyramid_scales`)."""
    plan = PyramidPlan.of(*bucket_hw, config)
    sides = range(max(bucket_hw) + 1)
    side_table = np.stack([level_sizes(n, n, list(plan.scales))[:, 0] for n in sides]).astype(np.int32)
    used = np.array([len(pyramid_scales(n, n, config.min_face_size, config.scale_factor)) for n in sides], np.int32)
    windows, cell_level, cell_rc = plan.cells
    return {"windows": windows, "cell_level": cell_level, "cell_rc": cell_rc, "level_side": side_table,
            "levels_used": used}


def traced_image_plan(sizes_Bx2: jax.Array, constants: dict[str, jax.Array], plan: PyramidPlan) -> tuple:
    """`pyramid.image_plan` inside the graph: level sizes (B, L, 2), levels used (B, L), and the taps
    (`level_taps` on jax arrays, each with a leading B), from `plan_constants`' tables."""
    level_hw = constants["level_side"][sizes_Bx2]  # (B, 2, L): each side's level sides
    level_hw = jnp.swapaxes(level_hw, 1, 2)
    used = constants["levels_used"][jnp.min(sizes_Bx2, axis=1)]
    level_on = jnp.arange(len(plan.scales))[None, :] < used[:, None]
    taps = jax.vmap(lambda hw, lhw: level_taps(hw, lhw, plan))(sizes_Bx2, level_hw)
    return level_hw, level_on, taps


def flat_params(params: dict) -> dict[str, np.ndarray]:
    """A param tree as {"pnet/conv1/conv/kernel": array, ...} (`checkpoint_integrity.named_arrays`; what
    weights.npz holds), refused when its names do not give the tree back (a name holding a '/')."""
    flat = named_arrays(params)
    if jax.tree_util.tree_structure(nested_params(flat)) != jax.tree_util.tree_structure(params):
        raise ValueError("the param tree cannot be flattened for the export: its names do not give it back "
                         "(a name holding a '/', or containers other than dicts)")
    return flat


def nested_params(flat: dict[str, Any]) -> dict:
    """The param tree back from `flat_params`' names."""
    tree: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def deployed_fn(weights: dict, constants: dict, images_BxHxWx3: jax.Array, sizes_Bx2: jax.Array,
                config: CascadeConfig) -> dict:
    """The exported function: `cascade_fn`'s outputs for images zero-padded into the bucket and their real
    sizes, plus "levels" (B,), the pyramid levels each image used (0: too small for one, no faces)."""
    plan = PyramidPlan.of(*images_BxHxWx3.shape[1:3], config)
    level_hw, level_on, taps = traced_image_plan(sizes_Bx2, constants, plan)
    out = cascade_fn(nested_params(weights), images_BxHxWx3, sizes_Bx2, level_hw, level_on, taps,
                     constants["windows"], constants["cell_level"], constants["cell_rc"], config=config)
    return {**out, "levels": jnp.sum(level_on, axis=1, dtype=jnp.int32)}


def export_bucket(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig = CascadeConfig(),
                  platforms: Sequence[str] | None = None) -> tuple[jax.export.Exported, dict, dict]:
    """`deployed_fn` for one bucket and batch size as a `jax.export.Exported` lowered for `platforms`
    (default: this machine's), and its arguments' arrays: (exported, weights, constants)."""
    if not PyramidPlan.of(*bucket_hw, config).scales:
        raise ValueError(f"bucket {bucket_hw[0]}x{bucket_hw[1]} is too small for min_face_size={config.min_face_size}")
    weights, constants = flat_params(params), plan_constants(bucket_hw, config)
    struct = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    arguments = (jax.tree_util.tree_map(struct, weights), jax.tree_util.tree_map(struct, constants),
                 jax.ShapeDtypeStruct((batch, *bucket_hw, 3), np.uint8), jax.ShapeDtypeStruct((batch, 2), np.int32))
    fn = jax.jit(functools.partial(deployed_fn, config=config))
    return jax.export.export(fn, platforms=platforms)(*arguments), weights, constants


# ------------------------------------------------------------------------------------ the artifact


README = """\
MTCNN face detector (mtcnn_jax {version}), exported for one bucket: images up to {h}x{w} pixels
(height x width), run {batch} at a time, on {platforms}.

    python run.py IMAGE... > faces.json

needs only Python 3, jax, numpy and pillow (pip install jax numpy pillow; for CUDA, jax[cuda12]). It prints the
JSON of `mtcnn-detect --json`: {{image: {{"boxes": [[x1, y1, x2, y2, score], ...], "landmarks": [[[x, y] x 5],
...], "overflow": {{stage: dropped}}}}}} ("converted" when an image was not 8-bit RGB). Boxes are 1-based pixel
indices as in detect_face.m; landmarks (left eye, right eye, nose, left and right mouth corner) run over
pixel edges (a point at numpy pixel index k reads k + 0.5). An image larger than the bucket, or one that
cannot be read, is an "error:" line and its {{"error": message}} entry; the others still run; the exit code
is then 1. The program compiles when run.py starts (seconds); set JAX_COMPILATION_CACHE_DIR=SOMEWHERE to
keep the compiled program between runs.

Files: cascade.jax (the serialized cascade, `jax.export`), weights.npz (the weights: {weights}),
plan.npz (the bucket's pyramid constants), manifest.json (bucket, batch, platforms, settings), run.py,
this README.{onnx}
Settings: minimum face {config.min_face_size} px, scale factor {config.scale_factor}, thresholds
{thresholds}, landmarks {mirror}.
"""

ONNX_README = """
pnet.onnx, rnet.onnx, onet.onnx: the three nets alone (ONNX opset {opset}), for runtimes that run the cascade
themselves. Input "images": float32 N x H x W x 3 RGB, (pixel - 127.5) * 0.0078125, row-major (not the
Caffe models' transposed images); P-Net takes any H, W >= 12, R-Net 24 x 24 crops, O-Net 48 x 48. Outputs
"logits" (face = index 1 after a softmax), "box" (dx1, dy1, dx2, dy2), O-Net's "landmarks" (x1..x5, y1..y5
relative to the crop); P-Net's are maps, one cell per 12 x 12 window at stride 2."""


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a file whole or not at all (a partial file never takes the name)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def artifact_files(exported: jax.export.Exported, weights: dict, constants: dict) -> dict[str, bytes]:
    """The files run.py runs (name -> contents): the program, its arrays and run.py itself."""
    return {FILES["program"]: bytes(exported.serialize()), FILES["weights"]: _npz(weights),
            FILES["plan"]: _npz(constants), FILES["runner"]: Path(export_runner.__file__).read_bytes()}


def description_files(manifest: dict, config: CascadeConfig, onnx_opset: int | None = None) -> dict[str, bytes]:
    """manifest.json and README.txt (with the ONNX nets' part when they were written)."""
    h, w = manifest["bucket"]
    readme = README.format(
        version=__version__, h=h, w=w, batch=manifest["batch"], platforms=", ".join(manifest["platforms"]),
        weights=manifest["weights"], config=config, thresholds=" / ".join(map(str, config.thresholds)),
        mirror="averaged with the mirrored crop's" if config.mirror_landmarks else "as detect_face.m",
        onnx=ONNX_README.format(opset=onnx_opset) if onnx_opset else "")
    return {FILES["manifest"]: json.dumps(manifest, indent=1).encode(), FILES["readme"]: readme.encode()}


def _manifest(bucket_hw: tuple[int, int], batch: int, platforms: Sequence[str], config: CascadeConfig,
              weights: str, onnx: bool) -> dict:
    """What run.py and a reader need to know: the shapes, the settings, the weights' origin, the versions."""
    return {"bucket": list(bucket_hw), "batch": batch, "platforms": list(platforms), "min_side": INPUT_SIZE["pnet"],
            "config": dataclasses.asdict(config), "weights": weights, "onnx": onnx, "mtcnn_jax": __version__,
            "jax": jax.__version__, "compiler_options": {p: compiled.compiler_options(p) for p in platforms}}


# ------------------------------------------------------------------------------------ command line


def _bucket(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 1024x768, got {text!r}")
    h, w = int(match[1]), int(match[2])
    least = INPUT_SIZE["pnet"]
    if not (least <= h <= MAX_SIDE and least <= w <= MAX_SIDE):
        raise argparse.ArgumentTypeError(f"each side must be {least} to {MAX_SIDE} pixels, got {text}")
    return h, w


def _platforms(text: str) -> tuple[str, ...]:
    names = tuple(p.strip().lower() for p in text.split(","))
    unknown = [p or "''" for p in names if p not in PLATFORMS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown platform {', '.join(unknown)}; choose from {', '.join(PLATFORMS)}")
    return tuple(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Export the whole cascade of one bucket (weights included) "
                                "with a loader, DIR/run.py, that needs only jax, numpy and pillow.",
                                epilog="DIR gets cascade.jax, weights.npz, plan.npz, manifest.json, run.py and "
                                "README.txt (what they are and how to run them), with --onnx also pnet.onnx, rnet.onnx "
                                "and onet.onnx. Exit code 2 for a bad flag; an existing DIR needs --overwrite, which "
                                "replaces only these files.")
    p.add_argument("--bucket", type=_bucket, required=True, metavar="HxW",
                   help="the largest image (height x width, pixels) the export takes; smaller ones are padded")
    p.add_argument("--batch", type=int, required=True, metavar="B", help="images per run of the program")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (see README.txt there)")
    p.add_argument("--platforms", type=_platforms, default=None, metavar="P[,P...]",
                   help=f"lower for these ({', '.join(PLATFORMS)}), all in one artifact (default: this machine's, "
                        f"{jax.export.default_export_platform()})")
    p.add_argument("--weights", default=None, help="a cascade checkpoint folder (default: the original weights)")
    p.add_argument("--onnx", action="store_true", help="also write the three nets as pnet.onnx, rnet.onnx, onet.onnx")
    p.add_argument("--overwrite", action="store_true", help="replace the artifact files in an existing --out")
    return p


def _check_out(out: Path, overwrite: bool) -> None:
    cli.output_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise cli.CliError(f"--out {out}: exists and is not empty; add --overwrite to replace the artifact in it")


@cli.entry(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: export one bucket's cascade (and with --onnx the nets) to --out; every flag checked first."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    out = Path(args.out).expanduser()
    _check_out(out, args.overwrite)
    if args.weights is not None:
        cli.existing_dir(args.weights, "--weights")
    if args.onnx and not all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnx")):
        raise cli.CliError("--onnx needs jax2onnx and onnx: pip install 'mtcnn_jax[onnx]'")
    config = CascadeConfig()
    if not PyramidPlan.of(*args.bucket, config).scales:
        parser.error(f"--bucket {args.bucket[0]}x{args.bucket[1]} holds no face of {config.min_face_size:g} px "
                     f"(each side must be at least {config.min_face_size:g})")
    platforms = args.platforms or (jax.export.default_export_platform(),)
    params = resolve_params(args.weights)
    exported, weights, constants = export_bucket(params, args.bucket, args.batch, config, platforms)
    manifest = _manifest(args.bucket, args.batch, platforms, config,
                         f"the checkpoint {args.weights}" if args.weights else "the original MTCNN weights", False)
    files = artifact_files(exported, weights, constants) | description_files(manifest, config)
    out.mkdir(parents=True, exist_ok=True)
    for name in (*FILES.values(), *ONNX_FILES):  # a file of an earlier export must not outlive it
        if (out / name).is_file() and name not in files:
            (out / name).unlink()
    for name, data in files.items():
        _write_atomic(out / name, data)
    size = sum(len(d) for d in files.values())
    print(f"wrote {out}: {args.bucket[0]}x{args.bucket[1]} bucket, batch {args.batch}, "
          f"{', '.join(platforms)} ({size / 2**20:.1f} MiB); run: python {out / FILES['runner']} IMAGE...")
    if args.onnx:  # after the cascade is written: a failure here loses nothing finished
        onnx_nets = importlib.import_module("mtcnn_jax.onnx_nets")  # an optional dependency
        for stage, model in onnx_nets.export_nets(params).items():
            _write_atomic(out / f"{stage}.onnx", model.SerializeToString())
        for name, data in description_files(manifest | {"onnx": True}, config, onnx_nets.OPSET).items():
            _write_atomic(out / name, data)
        print(f"wrote {', '.join(str(out / f) for f in ONNX_FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
