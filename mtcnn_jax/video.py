"""The detect command line on videos: `python -m mtcnn_jax.detect clip.mp4 [--json OUT.jsonl] [--draw OUT.mp4]
[--every N]`, and folders of videos.

Every frame of a video has one size, so one bucket and one compiled program. The videos are probed first
(size, frame count, rate; one that cannot be read is its error at once, first in the JSON), then decoded
one after another on a thread ahead of the device (`streams.background`) and run `--batch-size` frames at
a time (`streams.detect_frames`; a video's last batch runs padded, so its results and drawing are done
when it is). Outputs, all checked before any video is read (`check_outputs`):
- `--json OUT.jsonl`, JSON Lines written and flushed as frames are done: per detected frame {"video",
  "frame" (index from 0), "time" (seconds, the frame's pts in the stream's time base), then the image
  JSON's entry: "boxes", "landmarks", "overflow"}; after each video's last frame {"video", "frames",
  "detected", "faces"}, or {"video", "error", "frames"} for one that failed (a line without "frame"
  ends its video: a video without one was cut short).
- `--draw`: the annotated video, every frame at its input's size, frame rate and time stamps: a file
  (OUT.mp4) for one video, else a folder mirroring the inputs' paths (as .mp4 unless the container is
  one it writes: `video_io.DRAW_CODECS`).
- `--every N`: the cascade runs on frames 0, N, 2N, ... only; the frames between have no JSON line and
  are drawn with the boxes of the last detected frame.
Images and videos in one run: both run (videos first) when nothing is written; with --json, --draw or
--crops it is refused, since images write a JSON object and videos JSON Lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from mtcnn_jax import buckets, cli, compile_cache, compiled, outputs, streams
from mtcnn_jax.annotate import annotate_image
from mtcnn_jax.images import ImageError, first_copies
from mtcnn_jax.video_io import (DRAW_CODECS, VIDEO_SUFFIXES, Frame, VideoError, VideoInfo, VideoWriter, drawn_name,
                                is_video, probe, pyav, read_frames)


def split_inputs(files: Sequence[str]) -> tuple[list[str], list[str]]:
    """`images.list_inputs(inputs, IMAGE_SUFFIXES + VIDEO_SUFFIXES)`'s files split into the image files and
    the video files, each in the order listed."""
    return [f for f in files if not is_video(f)], [f for f in files if is_video(f)]


def _draw_targets(draw: str, videos: Sequence[str], overwrite: bool) -> list[Path]:
    """Where each video's drawing goes: the file --draw names for one video, else mirrored in the folder."""
    target = Path(draw)
    suffix = target.suffix.lower()
    if suffix in VIDEO_SUFFIXES and not target.is_dir():
        if len(videos) > 1:
            raise cli.CliError(f"--draw {draw}: {len(videos)} videos are drawn into a folder: give a folder name")
        if suffix not in DRAW_CODECS:
            raise cli.CliError(f"--draw {draw}: {suffix} videos are not written: name it {', '.join(DRAW_CODECS)}")
        paths = [outputs.check_json_target(target, "--draw", overwrite)]
    else:
        paths = outputs.mirror_paths(videos, target, drawn_name)
        outputs.check_folder_target(target, paths, "--draw", overwrite)
    inputs = {os.path.realpath(v) for v in videos}
    for path in paths:
        if os.path.realpath(path) in inputs:
            raise cli.CliError(f"--draw {draw}: would write over the input video {path}")
    return paths


def check_outputs(args: argparse.Namespace, videos: Sequence[str], images: Sequence[str]) -> list[Path] | None:
    """Refuse, before any work, what has no clear meaning for videos (a mix with images when writing,
    --crops, a --json not named .jsonl) and output paths that cannot be written or exist (unless
    --overwrite); the drawn videos' paths (None without --draw)."""
    writing = [flag for flag, value in (("--json", args.json), ("--draw", args.draw), ("--crops", args.crops)) if value]
    if images and writing:
        raise cli.CliError(f"the inputs hold {len(images)} image{'s' * (len(images) != 1)} and {len(videos)} "
                           f"video{'s' * (len(videos) != 1)}: with {', '.join(writing)} run them separately "
                           "(images write a JSON object and pictures, videos JSON Lines and videos)")
    if args.crops:
        raise cli.CliError("--crops makes aligned crops of images, not of videos (for frames: detect_stream and "
                           "align.align)")
    if args.json:
        if PurePath(args.json).suffix.lower() != ".jsonl":
            raise cli.CliError(f"--json {args.json}: videos write JSON Lines, one line per frame: name it .jsonl")
        outputs.check_json_target(args.json, "--json", args.overwrite)
    return _draw_targets(args.draw, videos, args.overwrite) if args.draw else None


class JsonLines:
    """A JSON Lines file written one line at a time and flushed (a run stopped midway keeps every line
    before); path None writes nothing."""

    def __init__(self, path: str | os.PathLike | None):
        self.file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "w")

    def add(self, entry: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()

    def __enter__(self) -> "JsonLines":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            self.file.close()


class _End(NamedTuple):
    """The tag after a video's last frame: how many frames were decoded, and why decoding stopped early."""

    frames: int
    error: VideoError | None


def _items(infos: Sequence[VideoInfo | VideoError], every: int, keep_pixels: bool) -> Iterator[streams.Item]:
    """`streams.detect_frames` items of the videos read one after another: each frame (tag: the Frame, its
    pixels kept when drawing; detected when its index is a multiple of `every`), then an _End."""
    for v, info in enumerate(infos):
        if isinstance(info, VideoError):
            continue  # reported before the run
        done, error = 0, None
        try:
            for frame in read_frames(info.path):
                done += 1
                tag = frame if keep_pixels else frame._replace(pixels=None)
                yield v, tag, frame.pixels if frame.index % every == 0 else streams.Passed()
        except VideoError as err:
            error = err
        yield v, _End(done, error), streams.Passed()
        yield v, None, streams.END


@dataclass
class _Video:
    """One video's part of a run."""

    path: str
    info: VideoInfo | VideoError
    drawing: Path | None
    writer: VideoWriter | None = None
    error: Exception | None = None  # writing its drawing failed
    detected: int = 0
    faces: int = 0
    frame_errors: int = 0
    last: Any = None  # the last detected frame's detections, drawn on the frames skipped after it


@dataclass
class _Run:
    """What a run writes as results come: JSON lines, drawings, progress, errors."""

    out: JsonLines
    bar: Any  # tqdm
    quiet: bool  # results go to --json, not stdout
    errors: int = 0
    frames: int = 0

    def report(self, line: str, err: bool = True) -> None:
        self.bar.write(line, file=sys.stderr if err else sys.stdout)

    def frame(self, video: _Video, frame: Frame, result: Any) -> None:
        """One frame's result: None (not detected), Detections or ImageError (its batch failed)."""
        self.frames += 1
        self.bar.update(1)
        if isinstance(result, ImageError):
            video.frame_errors, video.last = video.frame_errors + 1, None
            self.report(f"error: {result}")
            self.out.add({"video": video.path, "frame": frame.index, "time": frame.time, "error": str(result)})
        elif result is not None:
            video.detected, video.faces, video.last = video.detected + 1, video.faces + len(result), result
            self.out.add({"video": video.path, "frame": frame.index, "time": frame.time} | result.to_json())
        if video.drawing is not None and video.error is None:
            self._draw(video, frame)

    def _draw(self, video: _Video, frame: Frame) -> None:
        pixels = frame.pixels if video.last is None else np.asarray(annotate_image(frame.pixels, video.last))
        try:
            video.writer = video.writer or VideoWriter(video.drawing, video.info)
            video.writer.write(frame, pixels)
        except (pyav().error.FFmpegError, OSError, ValueError) as err:
            video.error = VideoError(f"{video.path}: --draw {video.drawing} could not be written ({err})")
            self.close(video)

    def close(self, video: _Video) -> None:
        """Finish the video's drawing (a playable file, however far it got)."""
        writer, video.writer = video.writer, None
        if writer is not None:
            try:
                writer.close()
            except (pyav().error.FFmpegError, OSError, ValueError) as err:
                video.error = video.error or VideoError(f"{video.path}: --draw {video.drawing}: {err}")

    def end(self, video: _Video, end: _End) -> None:
        """A video's last line: its totals, or why it failed."""
        self.close(video)
        error = end.error or video.error
        if error is not None:
            self.errors += 1
            self.report(f"error: {error}")
            self.out.add({"video": video.path, "error": str(error), "frames": end.frames})
            return
        self.errors += video.frame_errors > 0
        self.out.add({"video": video.path, "frames": end.frames, "detected": video.detected, "faces": video.faces})
        if not self.quiet:
            failed = f", {video.frame_errors} failed" if video.frame_errors else ""
            self.report(f"{video.path}: {end.frames} frames, {video.detected} detected{failed}, {video.faces} faces",
                        err=False)


def _probe_all(videos: Sequence[str]) -> list[VideoInfo | VideoError]:
    """Each video's VideoInfo, or its VideoError (a file given twice is one for its second mention)."""
    copies = first_copies(videos)
    infos: list[VideoInfo | VideoError] = []
    for v, path in enumerate(videos):
        if v in copies:
            first = videos[copies[v]]
            infos.append(VideoError(f"{path}: {'given' if path == first else f'the same file as {first}'} twice; its "
                                    f"results are under {first}"))
            continue
        try:
            infos.append(probe(path))
        except VideoError as err:
            infos.append(err)
    return infos


def main(parser: argparse.ArgumentParser, args: argparse.Namespace, videos: Sequence[str], images: Sequence[str],
         detector_of: Callable[[int | None], streams.Detector]) -> int:
    """Detect faces in the videos as `detect.main` was asked (see the module docstring); `detector_of`
    (the batch size) gives the cascade to run. Returns 1 when any video or frame failed, else 0."""
    copies = first_copies(videos)
    todo = [v for v in range(len(videos)) if v not in copies]
    drawings = check_outputs(args, [videos[v] for v in todo], images)
    drawings = dict(zip(todo, drawings)) if drawings else {}
    try:
        pyav()
    except ImportError as err:
        raise cli.CliError(str(err)) from None
    try:
        compile_cache.configure(args.compile_cache)
    except ValueError as err:
        parser.error(str(err))
    infos = _probe_all(videos)
    detector = detector_of(args.batch_size)
    probed = [i for i in infos if isinstance(i, VideoInfo)]
    shapes = [(buckets.bucket_shape(i.height, i.width, detector.config), detector.batch_size) for i in probed]
    total = sum(i.frames for i in probed) if all(i.frames for i in probed) else None
    state = [_Video(path, info, drawings.get(v)) for v, (path, info) in enumerate(zip(videos, infos))]
    with JsonLines(args.json) as out, \
            tqdm(total=total, unit="frame", file=sys.stderr, dynamic_ncols=True) as bar, \
            compiled.CompileAhead(detector.params, shapes, detector.config, on_change=lambda n: bar.set_postfix_str(
                f"{n} bucket{'s' * (n != 1)} compiling" if n else "all buckets compiled")), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        run = _Run(out, bar, quiet=bool(args.json))
        for video in state:
            if isinstance(video.info, VideoError):
                run.end(video, _End(0, video.info))
        items = streams.background(_items(infos, args.every, bool(drawings)), 4 * detector.batch_size)
        name = lambda v, tag: f"{videos[v]} frame {tag.index}"  # noqa: E731
        results = streams.detect_frames(items, detector, name=name)
        try:
            for v, tag, result in results:
                if isinstance(tag, _End):
                    run.end(state[v], tag)
                else:
                    run.frame(state[v], tag, result)
                for w in caught:
                    run.report(f"warning: {w.message}")
                caught.clear()
        finally:
            results.close()  # stops decoding
            for video in state:
                run.close(video)
    detected, faces = sum(v.detected for v in state), sum(v.faces for v in state)
    print(f"{len(videos)} video{'s' * (len(videos) != 1)}, {run.frames} frames ({detected} detected), {faces} faces, "
          f"{run.errors} errors" + (f" (written to {args.json})" if args.json else ""))
    return 1 if run.errors else 0
