"""The detect command line's flags: each one's default shown by --help, and each one checked before any
work, a bad value being one `error:` line that names the flag (the checks are `CascadeConfig`'s own).
"""

from __future__ import annotations

import argparse
import re

from mtcnn_jax import compile_cache
from mtcnn_jax.align import TEMPLATES, crop_geometry
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.stages import MIN_FACE_SIZE, SCALE_FACTOR, THRESHOLDS
from mtcnn_jax.video_io import VIDEO_SUFFIXES

PROG = "python -m mtcnn_jax.detect"
# Which CascadeConfig field bounds each stage that detect_bucket reports overflow for.
CAPACITY_FIELDS = {"window": "window_capacity", "pnet": "pnet_capacity",
                   "rnet": "rnet_capacity", "faces": "max_faces"}

EPILOG = ("""\
Exit code 0 when every image was processed, 1 when any failed, 2 for a bad flag or output path.
Before any image is read, every flag is checked, and so are the --json file and the --draw folder (a folder
given for a file or the reverse, a place that cannot be written, files that exist: refused unless
--overwrite). Each image's failure (not an image, truncated, unreadable, a broken link, a folder, over
PIL's decompression-bomb limit, the same file given twice) is one line on stderr and its entry
{"error": message} in the --json file; the other images still run. The --json file is valid JSON after
every image: {path: {"boxes": [[x1, y1, x2, y2, score], ...], "landmarks": [[[x, y] x 5], ...],
"overflow": {stage: dropped}, "converted": "RGBA -> RGB (alpha on white)" (only when converted),
"crops": [OUT_DIR/IMAGE_k.png per face], "crop_matrices": [2x3 image -> crop matrix per face] (with --crops)}}.
Grayscale, alpha, palette, CMYK and 16-bit images are converted to 8-bit RGB (alpha on white) unless
--strict. Drawings and crops mirror the inputs' paths below their deepest common folder, renamed (x-2.png)
where two would collide.

Videos (%s)
are decoded with PyAV and their frames run through one compiled bucket, batched. --json OUT.jsonl gets
one JSON line per detected frame as it is done, {"video": path, "frame": index, "time": seconds, "boxes",
"landmarks", "overflow"} as above, and after each video's last frame {"video", "frames", "detected",
"faces"}, or {"video", "error", "frames"} for a video that could not be read (exit code 1; the other videos
still run). --draw OUT.mp4 (one video) or OUT_DIR writes the annotated videos at the inputs' size, frame
rate and time stamps. --every N runs the cascade on frames 0, N, 2N, ...: the others get no JSON line and
are drawn with the last detected frame's boxes. --redetect-every N runs the whole cascade on every Nth
detected frame and R-Net and O-Net around the last faces in between (faster; new faces wait for the next
whole frame). Video frames are padded to multiples of 16 pixels, not the bucket ladder, unless
--bucket-multiple is given. Images and videos together both run (videos first) when
nothing is written; with --json, --draw or --crops (images only) they are refused: run them separately."""
          % " ".join(VIDEO_SUFFIXES))


def capacity_flag(field_name: str) -> str:
    """The command-line flag that sets a CascadeConfig field (build_parser adds one per capacity field)."""
    return "--" + field_name.replace("_", "-")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown (except where the help says it: defaults of None or False), the epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(prog=PROG, description="Detect faces and their five landmarks (MTCNN) in images, "
                                "videos and folders.", epilog=EPILOG, formatter_class=_Help)
    defaults = CascadeConfig()
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image or video files or folders (searched recursively)")
    p.add_argument("--weights", default=None, help="an Orbax cascade checkpoint folder (default: the original weights)")
    p.add_argument("--min-face-size", type=float, default=MIN_FACE_SIZE, help="smallest face side looked for, px")
    p.add_argument("--scale-factor", type=float, default=SCALE_FACTOR, help="image pyramid step, in (0, 1)")
    p.add_argument("--thresholds", type=float, nargs=3, default=THRESHOLDS, metavar=("T1", "T2", "T3"),
                   help="P-Net, R-Net and O-Net score thresholds, each in (0, 1]")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images (video frames) of one bucket run together (default: 1 on CPU, where larger "
                        "batches run slower per image, 8 on accelerators)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="batches run at once (default: 2, so that no core waits on another's sequential "
                        "parts; 1 with --redetect-every, which follows faces from batch to batch); each "
                        "holds its own working memory")
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="videos: run the cascade on every Nth frame (0, N, 2N, ...); the frames between have no "
                        "JSON line and are drawn with the last detected frame's boxes")
    p.add_argument("--redetect-every", type=int, default=1, metavar="N",
                   help="videos: the whole cascade on every Nth detected frame of a video (and whenever a face is "
                        "lost), R-Net and O-Net around the last frame's faces in between: faster, but faces that "
                        "appear are found only at the next whole frame (1: off)")
    p.add_argument("--bucket-multiple", type=int, default=defaults.bucket_multiple, metavar="N",
                   help="0 (default): pad image sides up to the bucket ladder 128, 192, 256, 384, 512, 768, "
                        "1024, ... (few compiles); N: up to multiples of N (less padding, one compile per "
                        "padded size); detections do not change")
    p.add_argument("--no-mirror-landmarks", dest="mirror_landmarks", action="store_false",
                   help="detect_face.m's landmarks exactly: no averaging with O-Net on the mirrored crops "
                        "(boxes and scores are the same either way)")
    compile_cache.add_flag(p)
    for field_name in CAPACITY_FIELDS.values():  # a capacity that overflows names its flag in the warning
        default = getattr(defaults, field_name)
        p.add_argument(capacity_flag(field_name), type=int, default=default, metavar="N",
                       help=f"CascadeConfig.{field_name}" + ("" if default else " (default: from the bucket's area)"))
    p.add_argument("--json", default=None, metavar="OUT.json",
                   help="write {path: detections or error} here, one entry a line as each image is done; for "
                        "videos OUT.jsonl, one JSON line per frame (default: print one line per image or video)")
    p.add_argument("--draw", default=None, metavar="OUT_DIR",
                   help="write annotated copies here, mirroring the inputs' folders; for one video a file such "
                        "as OUT.mp4 (default: none)")
    p.add_argument("--crops", default=None, metavar="OUT_DIR",
                   help="write each face's aligned crop here as IMAGE_k.png (k: the face's index in the JSON), "
                        "mirroring the inputs' folders, and list them in the JSON (default: none)")
    p.add_argument("--template", default="arcface112", choices=list(TEMPLATES),
                   help="the crops' geometry: arcface112 (insightface's 112x112), sphereface112x96 "
                        "(SphereFace/CosFace), facenet (the box plus --margin, square, as facenet-pytorch)")
    p.add_argument("--crop-size", type=int, default=None, metavar="N",
                   help="crop height in pixels, the width and the template's points scaled with it "
                        "(default: the template's own, 160 for facenet)")
    p.add_argument("--margin", type=float, default=0.0, metavar="PX",
                   help="facenet template: margin around the box, in crop pixels")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the --json file, drawings and crops that exist")
    p.add_argument("--strict", action="store_true",
                   help="refuse images that are not 8-bit RGB instead of converting them (images only: "
                        "video frames are decoded to RGB)")
    return p


def check_crops(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--template, --crop-size and --margin: only with --crops, and a crop `align` can make."""
    given = [flag for flag, value, default in (("--template", args.template, "arcface112"),
             ("--crop-size", args.crop_size, None), ("--margin", args.margin, 0.0)) if value != default]
    if given and not args.crops:
        parser.error(f"{', '.join(given)} shape the aligned crops: add --crops OUT_DIR")
    if args.crop_size is not None and args.crop_size < 1:
        parser.error(f"--crop-size must be >= 1, got {args.crop_size}")
    try:
        crop_geometry(args.template, args.crop_size, margin=args.margin)
    except ValueError as err:
        parser.error(str(err).replace("margin", "--margin", 1))


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> CascadeConfig:
    """The CascadeConfig of the flags; a value out of range is parser.error naming its flag."""
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    for flag in ("every", "redetect_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.workers not in (None, 1) and args.redetect_every > 1:
        parser.error(f"--redetect-every runs one batch at a time (it follows faces from batch to batch): "
                     f"drop --workers {args.workers}")
    flags = {f: getattr(args, f) for f in (*CAPACITY_FIELDS.values(), "min_face_size", "scale_factor",
                                           "bucket_multiple", "mirror_landmarks")}
    try:
        return CascadeConfig(thresholds=tuple(args.thresholds), **flags)
    except ValueError as err:
        parser.error(re.sub(r"\b(%s|thresholds)\b" % "|".join(flags), lambda m: capacity_flag(m[1]), str(err)))
