"""The detect command line on image files (`detect.main` hands them here, after the flags and videos).

Output targets are checked before any image is read; the files' sizes come from their headers
(`WorkOrder`: the buckets planned and merged, compiled ahead on a thread); chunks are loaded here and run
`--workers` at a time (`in_order`), results written in input order as they come (`outputs`), every failure
an `error:` line and a JSON entry. The detection itself is `detections.detect_loaded`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Callable, NamedTuple, Sequence

from PIL import Image
from tqdm import tqdm

from mtcnn_jax import buckets, compile_cache, compiled, detections, images, outputs
from mtcnn_jax.annotate import annotate_image
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.detections import Detections
from mtcnn_jax.images import ImageError, first_copies
from mtcnn_jax.in_order import InOrder, failed_images


def _summary(det: Detections) -> str:
    scores = ", ".join(f"{s:.2f}" for s in det.scores[:8]) + (", ..." if len(det) > 8 else "")
    note = f" [{det.converted}]" if det.converted else ""
    return f"{len(det)} face{'s' if len(det) != 1 else ''}" + (f" ({scores})" if len(det) else "") + note


def _detect_chunk(loaded: list, names: list[str], notes: list, params: Any, cfg: CascadeConfig, batch_size: int,
                  merged: dict) -> tuple[list[Detections | ImageError], list[str]]:
    """detect_loaded on one chunk (on a worker thread, in the folder's `merged` buckets), and its capacity
    warnings as lines."""
    lines: list[str] = []
    results = detections.detect_loaded(loaded, names, params, cfg, batch_size, notes, merged=merged,
                                       warn=lambda name, det: lines.extend(detections.overflow_messages(name, det)))
    return results, [f"warning: {line}" for line in lines]


class WorkOrder(NamedTuple):
    """The CLI's plan for a folder, from the files' headers: its batches (`buckets.plan`, in the buckets
    `detections.merges` chose), every file's index in chunks of work (the planned batches in order, then
    the files no bucket was planned for: unreadable headers, images too small for a face, in chunks of
    `batch_size`), and the merges, which the chunks run in."""
    batches: list[tuple[buckets.Bucket, list[int]]]
    chunks: list[list[int]]
    merged: dict[buckets.Bucket, buckets.Bucket]


def _work_order(files: Sequence[str], params: Any, cfg: CascadeConfig, batch_size: int) -> WorkOrder:
    """The `WorkOrder` of these files."""
    with warnings.catch_warnings():  # a header over PIL's pixel limit: its load says so, as an error
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        sizes = [buckets.header_hw(f) for f in files]
    merged = detections.merges(sizes, params, cfg, batch_size)
    batches = buckets.plan(sizes, cfg, batch_size, merged)
    planned = {i for _, chunk in batches for i in chunk}
    rest = [i for i in range(len(files)) if i not in planned]
    chunks = [chunk for _, chunk in batches] + [rest[k : k + batch_size] for k in range(0, len(rest), batch_size)]
    return WorkOrder(batches, chunks, merged)


def _compiling(n: int) -> str:
    """The progress bar's note on compiling ahead."""
    return f"{n} bucket{'s' if n != 1 else ''} compiling" if n else "all buckets compiled"


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg: CascadeConfig, files: list[str],
        resolve_params: Callable[[str | None], dict]) -> int:
    """The CLI on image files: targets checked first, then the weights (`resolve_params(args.weights)`);
    chunks loaded here, run `--workers` at a time while the next loads (buckets compiled ahead on a thread),
    written in input order as done. Returns the failures."""
    copies = first_copies(files)
    errors: dict[int, ImageError] = {i: ImageError(
        f"{files[i]}: {'given' if files[i] == files[j] else f'the same file as {files[j]}'} twice; its results "
        f"are under {files[j]}") for i, j in copies.items()}
    todo = [i for i in range(len(files)) if i not in copies]
    drawings = dict(zip(todo, outputs.mirror_paths([files[i] for i in todo], args.draw, outputs.drawing_name))
                    ) if args.draw else {}
    if args.json:
        outputs.check_json_target(args.json, "--json", args.overwrite)
    if args.draw:
        outputs.check_folder_target(args.draw, list(drawings.values()), "--draw", args.overwrite)
    crop_bases = dict(zip(todo, outputs.mirror_paths([files[i] for i in todo], args.crops, outputs.crop_base))
                      ) if args.crops else {}
    if args.crops:
        outputs.check_crops_target(args.crops, list(crop_bases.values()), "--crops", args.overwrite)
    try:
        compile_cache.configure(args.compile_cache)
    except ValueError as err:
        parser.error(str(err))
    params = resolve_params(args.weights)
    batch_size = args.batch_size or buckets.default_batch_size()
    workers = args.workers or buckets.default_workers()
    work = _work_order([files[i] for i in todo], params, cfg, batch_size)
    faces = done = 0
    with outputs.ResultsJson(args.json) as results, \
            tqdm(total=len(files), unit="img", file=sys.stderr, dynamic_ncols=True) as bar, \
            compiled.CompileAhead(params, [(b, len(c)) for b, c in work.batches], cfg,
                                  on_change=lambda n: bar.set_postfix_str(_compiling(n))):
        def report(line: str, err: bool = True) -> None:
            bar.write(line, file=sys.stderr if err else sys.stdout)

        def failed(i: int, err: ImageError) -> None:
            errors[i] = err
            report(f"error: {err}")
            if i not in copies or files[i] != files[copies[i]]:  # the same string has its entry already
                results.add(files[i], {"error": str(err)})

        def finish(indices: list[int], loaded: list, found: list, lines: list[str]) -> None:
            nonlocal faces, done
            for line in lines:
                report(line)
            for i, img, det in zip(indices, loaded, found):
                if isinstance(det, ImageError):
                    failed(i, det)
                    continue
                if args.draw:
                    outputs.write_drawing(drawings[i], annotate_image(img, det))
                det = detections.with_crops(img, det, args.template if args.crops else None, args.crop_size,
                                            args.margin)
                entry = det.to_json()
                if args.crops:
                    entry["crops"] = outputs.write_crops(crop_bases[i], det.aligned.crops)
                results.add(files[i], entry)
                faces, done = faces + len(det), done + 1
                if not args.json:
                    report(f"{files[i]}: {_summary(det)}", err=False)
            bar.update(len(indices))

        for i, err in list(errors.items()):
            failed(i, err)
        bar.update(len(errors))

        def collect(pool: InOrder, depth: int | None) -> None:
            for (indices, loaded), out, err in pool.done(depth):
                if err is not None:  # the chunk's run failed: each of its images not failed already says why
                    out = [x if isinstance(x, ImageError) else e
                           for x, e in zip(loaded, failed_images([files[i] for i in indices], err))], []
                finish(indices, loaded, *out)

        with InOrder(workers, "mtcnn-detect") as pool:  # chunks in the order of work.chunks: results go out in it
            try:
                for chunk in work.chunks:
                    indices = [todo[k] for k in chunk]
                    names = [files[i] for i in indices]
                    loaded, notes = map(list, zip(*[images.try_load(n, n, args.strict) for n in names]))
                    pool.submit((indices, loaded), _detect_chunk, loaded, names, notes, params, cfg, batch_size,
                                work.merged)
                    collect(pool, workers)
            finally:  # also on Ctrl-C or a crash: the images already sent (at most workers + 1) are kept
                collect(pool, None)
    print(f"{done} images, {faces} faces, {len(errors)} errors" + (f" (written to {args.json})" if args.json else ""))
    return len(errors)
