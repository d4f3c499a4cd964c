"""Per-stage training samples (Zhang et al. 2016, Sec. II-C and III-A), from the TFDS datasets of WIDER FACE
and a landmark set to a TFDS sample set.

P-Net (12 px): random crops of WIDER FACE training images. R-Net (24 px) and O-Net (48 px): the earlier
stages' detections on the same images (hard examples, sample_mining). Crops are labelled by IoU
(sample_geometry) and cut by worker processes (sample_worker); types are mixed 3 : 1 : 1 : 2 (neg : pos :
part : landmark) and the kept samples written as the TFDS dataset mtcnn_samples/<stage> under --out
(datasets.MtcnnSamples; read it back with `mtcnn_jax.datasets.load_samples`). Each record keeps its
provenance ("source" image, "crop" box in its pixels, "flipped") so that any label can be audited.

    python -m mtcnn_jax.samples {pnet,rnet,onet} --wider DIR --landmarks DIR --out DIR [--weights CKPT]
        [--tfds-dir DIR] [--max-images N] [--seed S] [--workers W] [--ratio 3:1:1:2] [--min-face 20]
        [--face-jitters 0] [--square-faces] [--shard I/N]

`--shard I/N` makes one of N shards of the set, on as many machines or processes as there are shards: the
images (and landmark faces) at positions I, I + N, I + 2N, ... of the source lists, each cut exactly as
the whole run cuts it, mixed to --ratio within the shard, written to OUT/shard-I-of-N/. Once all N are
under OUT (a shared folder, or copied together), `mtcnn_jax.train --data OUT` reads them as one set
(`sample_shards.load_sample_set`).

The WIDER FACE folder (official layout) and the landmark folder (LFW+Net's trainImageList.txt, else
CelebA's lists) are read through their TFDS builders (datasets.WiderFace, LfwNet, CelebaWild): each is
built once into --tfds-dir (default: ~/.cache/mtcnn_jax/tfds), in a folder of its own per source folder,
and read again by later runs and the other stages (delete that folder after changing the source's files).
`--face-jitters N` adds N jittered crops around every face to the R-/O-Net detections (more positives and
part faces than the earlier stages find on a small set); `--min-face` is the smallest face or detection
cropped (12 lets R-/O-Net see the small candidates they meet at inference); `--square-faces` labels
crops by IoU with each face's square, so that narrow faces can be positives too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

# TFDS (mtcnn_jax.datasets) and JAX (mtcnn_jax.sample_mining, compile_cache, pretrained) are reached through
# the lazy package, not imported here: a spawned sample worker imports the CLI's module as its __main__ and
# must start light (numpy and PIL only).
import mtcnn_jax
from mtcnn_jax import cli
from mtcnn_jax.sample_geometry import SampleConfig, select
from mtcnn_jax.sample_shards import SHARD_FOLDER, check_shard, parse_shard, shard_jobs
from mtcnn_jax.sample_worker import run_job
from mtcnn_jax.stages import INPUT_SIZE, LABEL
from mtcnn_jax.stages import SAMPLE_TYPES as TYPES

WINDOW = 256  # images whose bytes are read and handed to the workers at a time (at least 16 per worker)


class SamplesError(ValueError):
    """No samples could be made (all inputs skipped, or nothing labelled): nothing is written."""


# ----------------------------------------------------------------------------------------- sources

def source_data_dir(tfds_dir: str | Path, manual_dir: str | Path) -> Path:
    """The TFDS data_dir a source folder is built into: <folder name>-<hash of its absolute path> under
    tfds_dir, so that two folders (a subset and the full set, say) never share a build."""
    root = Path(manual_dir).resolve()
    return Path(tfds_dir) / f"{root.name}-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}"


def source_dataset(builder_cls: type, manual_dir: str | Path, tfds_dir: str | Path) -> Any:
    """The builder of a source folder's dataset, built on first use (what it skipped is in the summary)."""
    return mtcnn_jax.datasets.build(builder_cls, manual_dir, source_data_dir(tfds_dir, manual_dir), allow_empty=True)


def landmark_builder(landmarks_dir: str | Path) -> tuple[type, Path]:
    """The builder of a landmark folder (LFW+Net if it holds trainImageList.txt, else CelebA in the wild)
    and the folder its image paths are relative to."""
    ds = mtcnn_jax.datasets
    if (Path(landmarks_dir) / "trainImageList.txt").is_file():
        return ds.LfwNet, ds.landmark_image_dir(landmarks_dir, "trainImageList.txt")
    return ds.CelebaWild, ds.landmark_image_dir(landmarks_dir)


def records(source: Any, n: int, chunk: int = 256) -> Iterator[dict]:
    """The first n records of a data source, read `chunk` at a time."""
    for start in range(0, n, chunk):
        yield from source.__getitems__(list(range(start, min(n, start + chunk))))


def source_jobs(kind: str, source: Any, image_dir: Path, limit: int | None = None) -> list[dict]:
    """One job per record of a source's train split (the first `limit`): "wider" jobs carry the image's faces
    ("gt", x1, y1, x2, y2), "landmark" jobs its face ("box", "points"); both the image's path ("path",
    provenance) and the record's index ("index", the job's seed and where its image bytes are read)."""
    jobs = []
    for i, r in enumerate(records(source, len(source) if limit is None else min(limit, len(source)))):
        job = {"kind": kind, "index": i, "path": str((image_dir / r["image/filename"].decode()).resolve())}
        job.update({"gt": np.reshape(r["faces"]["box"], (-1, 4))} if kind == "wider" else
                   {"box": r["box"], "points": r["landmarks"]})
        jobs.append(job)
    return jobs


def with_images(jobs: list[dict], sources: dict[str, Any]) -> list[dict]:
    """The jobs with their image file bytes ("image"), read from their sources in one read per kind."""
    images = {}
    for kind, source in sources.items():
        idx = [j["index"] for j in jobs if j["kind"] == kind]
        if idx:
            images.update({(kind, i): r["image"] for i, r in zip(idx, source.__getitems__(idx))})
    return [{**j, "image": images[j["kind"], j["index"]]} for j in jobs]


def run_jobs(jobs: list[dict], sources: dict[str, Any], cfg: SampleConfig, work_dir: Path, workers: int) -> list[dict]:
    """All jobs, in order, over a spawn pool of `workers` processes (in-process for 1), with a progress bar.
    The image bytes are read a window of jobs at a time, so memory holds one window's images."""
    fn = functools.partial(run_job, cfg=cfg, work_dir=str(work_dir))
    window, results = max(WINDOW, 16 * workers), []
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else contextlib.nullcontext()
    with pool, tqdm(total=len(jobs), desc=f"{cfg.stage} samples", unit="image", file=sys.stderr) as bar:
        for start in range(0, len(jobs), window):
            part = with_images(jobs[start : start + window], sources)
            for result in (pool.imap(fn, part, chunksize=4) if workers > 1 else map(fn, part)):
                results.append(result)
                bar.update()
    return results


# ----------------------------------------------------------------------------------------- mixing

def mix_counts(available: dict[str, int], ratio: Sequence[float]) -> dict[str, int]:
    """How many of each type to keep for negative : positive : part : landmark = ratio: the larger types are
    subsampled to the scarcest one (types with ratio 0 are dropped, types with none available are ignored)."""
    weights = dict(zip(TYPES, ratio))
    units = [available[t] / weights[t] for t in TYPES if weights[t] > 0 and available[t] > 0]
    unit = min(units) if units else 0
    return {t: min(available[t], int(np.floor(unit * weights[t] + 1e-9))) for t in TYPES}


def choose(results: list[dict], ratio: Sequence[float], seed: int) -> tuple[list[np.ndarray], dict, dict]:
    """Per-job keep masks after mixing to the ratio (a seeded random subset of each type), with the counts
    generated and kept per type."""
    labels = np.concatenate([r["table"]["label"] for r in results] or [np.zeros(0, np.int32)])
    available = {t: int((labels == LABEL[t]).sum()) for t in TYPES}
    kept = mix_counts(available, ratio)
    keep = np.zeros(len(labels), bool)
    rng = np.random.default_rng([seed, 2])
    for t in TYPES:
        idx = np.nonzero(labels == LABEL[t])[0]
        keep[np.sort(rng.permutation(idx)[: kept[t]])] = True
    bounds = np.cumsum([0] + [len(r["table"]["label"]) for r in results])
    return [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:])], available, kept


# ----------------------------------------------------------------------------------------- writing

def kept_parts(results: list[dict], keep: list[np.ndarray], work_dir: Path) -> Iterator[dict]:
    """The kept samples, one source image at a time, with their pixels read back from work_dir and their
    record keys (<kind><index>_<row>)."""
    for r, keep_N in zip(results, keep):
        rows = np.nonzero(keep_N)[0]
        if len(rows):
            name = f"{r['kind']}{r['index']:08d}"
            yield {"keys": [f"{name}_{row:05d}" for row in rows], "source": r["path"],
                   "table": select(r["table"], keep_N), "pixels": np.load(work_dir / f"{r['kind']}_{r['index']:08d}.npy")[rows]}


def write_samples(out: Path, stage: str, results: list[dict], keep: list[np.ndarray], work_dir: Path) -> Path:
    """Write the kept samples as the TFDS dataset mtcnn_samples/<stage> under `out` (array_record) through
    the sample set builder, staged in work_dir."""
    total = int(sum(k.sum() for k in keep))
    staged = mtcnn_jax.datasets.stage_samples(work_dir / "sample_set", INPUT_SIZE[stage], total,
                                              kept_parts(results, keep, work_dir))
    return Path(mtcnn_jax.datasets.build(mtcnn_jax.datasets.MtcnnSamples, staged, out, config=stage).data_dir)


# ----------------------------------------------------------------------------------------- pipeline

def summarise(results: list[dict], builders: dict[str, Any], available: dict, kept: dict, cfg: SampleConfig,
              extra: dict) -> dict:
    """Counts per type (generated, kept, dropped by the mix), inputs skipped by reason with first names
    (by the source builders and by the workers)."""
    skipped = mtcnn_jax.datasets.Skipped()
    for builder in builders.values():
        skipped.merge(builder.skipped.get("train", mtcnn_jax.datasets.Skipped()))
    for r in results:
        for reason in r.get("skipped", []):
            skipped.add(reason, r["path"])
    return {"stage": cfg.stage, "size": cfg.size, "seed": cfg.seed, "ratio": list(cfg.ratio),
            "square_faces": cfg.square_faces, "landmark_frame": list(cfg.landmark_frame),
            "images": sum(r["kind"] == "wider" for r in results),
            "landmark_faces": sum(r["kind"] == "landmark" for r in results),
            "generated": available, "kept": kept, "dropped_by_ratio": {t: available[t] - kept[t] for t in TYPES},
            "total": sum(kept.values()),
            "skipped": {k: {"count": n, "first": skipped.names[k]} for k, n in skipped.counts.items()}, **extra}


def check_request(wider: str | Path, landmarks: str | Path | None, out: Path, cfg: SampleConfig, *,
                  weights: str | Path | None, max_images: int | None, max_landmarks: int | None,
                  workers: int | None, tfds_dir: str | Path | None) -> None:
    """What `make_samples` refuses before any work (named by its CLI flag): missing input folders, counts
    below 1, output folders that are files, a sample set already in `out`, --weights for P-Net samples."""
    for flag, path in (("--wider", wider), ("--landmarks", landmarks)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{flag} {path}: no such folder")
    for flag, n in (("--max-images", max_images), ("--max-landmarks", max_landmarks), ("--workers", workers)):
        if n is not None and not (isinstance(n, int) and n >= 1):
            raise ValueError(f"{flag} {n}: expected an integer >= 1")
    for flag, path in (("--out", out), ("--tfds-dir", tfds_dir)):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise NotADirectoryError(f"{flag} {path}: is a file, expected a folder")
    if (out / "mtcnn_samples" / cfg.stage).exists():
        raise FileExistsError(f"{out / 'mtcnn_samples' / cfg.stage} exists: pick a new --out or delete it")
    if weights is not None and cfg.stage == "pnet":
        raise ValueError("--weights: P-Net samples are random crops, only R-/O-Net samples run a cascade")
    if weights is not None and not Path(weights).is_dir():
        raise FileNotFoundError(f"--weights {weights}: no such cascade checkpoint folder")


def make_samples(wider: str | Path, landmarks: str | Path | None, out: str | Path, cfg: SampleConfig = SampleConfig(),
                 *, weights: str | Path | None = None, max_images: int | None = None,
                 max_landmarks: int | None = None, workers: int | None = None,
                 tfds_dir: str | Path | None = None, shard: tuple[int, int] | None = None) -> dict:
    """Make one stage's sample set from WIDER FACE training images and a landmark set (read through their
    TFDS datasets, built under `tfds_dir` if not yet there), write it to `out` as a TFDS dataset with
    summary.json beside it, and return the summary. Raises SamplesError if empty. With `shard` (index,
    count): that shard of the images only, written to `out`/shard-index-of-count (`shard_jobs`)."""
    out, start = Path(out), time.perf_counter()
    if shard is not None:  # checked, then written under its own folder
        out = check_shard(shard) or out / SHARD_FOLDER.format(index=shard[0], count=shard[1])
    check_request(wider, landmarks, out, cfg, weights=weights, max_images=max_images, max_landmarks=max_landmarks,
                  workers=workers, tfds_dir=tfds_dir)
    # R-/O-Net: the mining cascade's weights are read now, so that a bad --weights fails before any work.
    params = None if cfg.stage == "pnet" else mtcnn_jax.detect.resolve_params(str(weights) if weights else None)
    tfds_dir = Path(tfds_dir) if tfds_dir else mtcnn_jax.pretrained.cache_dir() / "tfds"  # the user cache
    builders = {"wider": source_dataset(mtcnn_jax.datasets.WiderFace, wider, tfds_dir)}
    image_dirs = {"wider": mtcnn_jax.datasets.wider_image_dir(wider, "train")}
    limits = {"wider": max_images, "landmark": max_landmarks}
    if landmarks:
        builder_cls, image_dirs["landmark"] = landmark_builder(landmarks)
        builders["landmark"] = source_dataset(builder_cls, landmarks, tfds_dir)
    sources = {kind: mtcnn_jax.datasets.data_source(b, "train", decode_images=False) for kind, b in builders.items()
               if "train" in b.info.splits and b.info.splits["train"].num_examples}  # none: all skipped
    jobs = [job for kind in sources for job in source_jobs(kind, sources[kind], image_dirs[kind], limits[kind])]
    extra: dict[str, Any] = {}
    if shard is not None:
        jobs, extra["shard"] = shard_jobs(jobs, *shard), list(shard)
    if cfg.stage != "pnet":
        read = lambda job: sources["wider"][job["index"]]["image"]  # noqa: E731
        extra["overflow"] = mtcnn_jax.sample_mining.add_detections(
            [j for j in jobs if j["kind"] == "wider"], read, params, cfg.stage)
    work_dir = out / ".work"
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = run_jobs(jobs, sources, cfg, work_dir, workers or os.cpu_count() or 1)
        keep, available, kept = choose(results, cfg.ratio, cfg.seed)
        extra["seconds"] = round(time.perf_counter() - start, 2)
        summary = summarise(results, builders, available, kept, cfg, extra)
        if summary["total"] == 0:
            raise SamplesError(f"no samples: {json.dumps(summary)}")
        summary["dataset"] = str(write_samples(out, cfg.stage, results, keep, work_dir))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------------------- CLI

PROG = "python -m mtcnn_jax.samples"


def _numbers(text: str, sep: str, example: str) -> tuple[float, ...]:
    """`text` as floats separated by `sep`, as many as `example` holds; ArgumentTypeError otherwise."""
    count = len(example.split(sep))
    try:
        parts = tuple(float(p) for p in text.split(sep))
    except ValueError:
        parts = ()
    if len(parts) != count:
        words = {3: "three", 4: "four"}.get(count, str(count))
        raise argparse.ArgumentTypeError(f"expected {words} numbers like {example}, got {text!r}")
    return parts


def parse_frame(text: str) -> tuple[float, float, float]:
    """argparse type: "1.1,1.4,-0.07" -> (1.1, 1.4, -0.07) (SampleConfig checks the values)."""
    return _numbers(text, ",", "1.1,1.4,-0.07")


def parse_ratio(text: str) -> tuple[float, float, float, float]:
    """"3:1:1:2" -> (3, 1, 1, 2): negative : positive : part : landmark (SampleConfig checks the values)."""
    return _numbers(text, ":", "3:1:1:2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=list(INPUT_SIZE))
    p.add_argument("--wider", required=True, help="WIDER FACE root (WIDER_train/images, wider_face_split/)")
    p.add_argument("--landmarks", help="LFW+Net folder (trainImageList.txt) or CelebA folder (list_*_celeba.txt, img_celeba/)")
    p.add_argument("--out", required=True, help="output folder (the dataset and summary.json)")
    p.add_argument("--tfds-dir", help="where the WIDER FACE and landmark folders are built as TFDS datasets, once "
                                      "(one folder per source folder; default: ~/.cache/mtcnn_jax/tfds)")
    p.add_argument("--weights", help="cascade checkpoint dir for R-Net/O-Net mining (default: the original weights)")
    p.add_argument("--max-images", type=int, help="first N WIDER training images only")
    p.add_argument("--max-landmarks", type=int, help="first N landmark faces only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    p.add_argument("--ratio", type=parse_ratio, default=(3, 1, 1, 2), help="negative:positive:part:landmark")
    p.add_argument("--flip-prob", type=float, default=0.5, help="mirror positives and landmark samples")
    p.add_argument("--min-face", type=int, default=20,
                   help="faces and R-/O-Net detections smaller than this (pixels) are not cropped around")
    p.add_argument("--face-jitters", type=int, default=0,
                   help="R-/O-Net: also N jittered crops around each face, besides the detections")
    p.add_argument("--square-faces", action="store_true",
                   help="label crops by IoU with each face's square box (narrow faces can be positives)")
    p.add_argument("--landmark-frame", type=parse_frame, default=(1.0, 1.0, 0.0), metavar="SW,SH,DY",
                   help="cut landmark samples around each landmark box scaled by SW in width and SH in height, "
                        "its centre moved down by DY of its height: the frame the detector gives those faces "
                        "(default 1,1,0: the box as given)")
    p.add_argument("--shard", type=parse_shard, metavar="I/N",
                   help="make shard I of N (0 <= I < N) of the set, in OUT/shard-I-of-N; train on OUT reads all N")
    mtcnn_jax.compile_cache.add_flag(p)
    return p


@cli.entry(PROG)
def main(argv: list[str] | None = None) -> int:
    """CLI entry: every flag and path is checked (SampleConfig, `check_request`) before any dataset is built."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = SampleConfig(stage=args.stage, ratio=args.ratio, seed=args.seed, flip_prob=args.flip_prob,
                           hard_face_jitters=args.face_jitters, min_face=args.min_face,
                           square_faces=args.square_faces, landmark_frame=args.landmark_frame)
        if args.shard is not None:
            check_shard(args.shard)
        if args.stage != "pnet":  # only R-Net and O-Net samples run the cascade
            mtcnn_jax.compile_cache.configure(args.compile_cache)
    except ValueError as err:
        parser.error(str(err))
    with contextlib.redirect_stdout(sys.stderr):  # TFDS's build messages: stdout is the summary alone
        summary = make_samples(args.wider, args.landmarks, args.out, cfg, weights=args.weights,
                               max_images=args.max_images, max_landmarks=args.max_landmarks,
                               workers=args.workers, tfds_dir=args.tfds_dir, shard=args.shard)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
