"""Videos in and out with PyAV: frames decoded to upright 8-bit RGB, annotated copies encoded.

`read_frames` decodes a video file (or anything FFmpeg opens: a camera device, an RTSP URL) into frames
with their index and time stamp, for `detect.detect_stream`; `probe` reads a video's size, frame count
and rate; `VideoWriter` encodes a drawn copy at the input's frame rate and time stamps. A video that
cannot be read is a `VideoError` naming it. PyAV is the optional `video` extra (`pip install
'mtcnn_jax[video]'`), imported when a video is first read, so the detector runs without it.
"""

from __future__ import annotations

import errno
import importlib
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePath
from typing import Any, Iterator, NamedTuple

import numpy as np

from mtcnn_jax.stages import INPUT_SIZE

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                  ".wmv", ".flv", ".3gp", ".ogv")
# The containers --draw writes, and their encoder (the first one this FFmpeg build has).
DRAW_CODECS = {".mp4": ("libx264", "mpeg4"), ".m4v": ("libx264", "mpeg4"), ".mov": ("libx264", "mpeg4"),
               ".mkv": ("libx264", "mpeg4"), ".webm": ("libvpx-vp9", "libvpx"), ".avi": ("mpeg4",)}
ENCODER_OPTIONS = {"libx264": {"crf": "20", "preset": "veryfast"},
                   "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"},
                   "libvpx": {"deadline": "realtime", "cpu-used": "8"}}
DEFAULT_RATE = Fraction(30)  # frames/s of a drawn video whose input does not say


class VideoError(ValueError):
    """A video that cannot be read or written; the message names it and says what went wrong."""


def pyav() -> Any:
    """PyAV, imported on first use (an optional dependency: the `video` extra); ImportError saying how to
    install it."""
    try:
        return importlib.import_module("av")
    except ImportError as err:
        raise ImportError(f"videos need PyAV: pip install 'mtcnn_jax[video]' ({err})") from None


def is_video(path: str | os.PathLike) -> bool:
    """Whether the path has a video suffix (`VIDEO_SUFFIXES`)."""
    return PurePath(path).suffix.lower() in VIDEO_SUFFIXES


# ---------------------------------------------------------------------------------------------- decoding

class Frame(NamedTuple):
    """One decoded frame: its index in the video, time stamp in seconds (None when the stream has none),
    pixels (H, W, 3) uint8 RGB upright, and its pts in the stream's time base (None when absent)."""

    index: int
    time: float | None
    pixels: np.ndarray | None
    pts: int | None


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns from a video's header and first frame: the frames' upright size, the frame
    count (0 when the container does not say), the frame rate and time base (None when unknown)."""

    path: str
    height: int
    width: int
    frames: int
    rate: Fraction | None
    time_base: Fraction | None


def upright(pixels_HxWx3: np.ndarray, rotation: int) -> np.ndarray:
    """A frame turned as its display matrix says (`rotation`: degrees counterclockwise, as PyAV's
    `VideoFrame.rotation`), e.g. a phone's portrait video."""
    turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(pixels_HxWx3, turns)) if turns else pixels_HxWx3


def _failed(path: str, err: Exception, done: int | None = None) -> VideoError:
    if isinstance(err, OSError) and err.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR):
        return VideoError(f"{path}: cannot be read ({err.strerror}); check the path and its permissions")
    after = f" after {done} frame{'s' if done != 1 else ''}" if done else ""
    what = str(err).strip() or type(err).__name__
    return VideoError(f"{path}: could not be decoded{after} ({what}); the file is not a video FFmpeg reads, or it "
                      "is truncated or corrupt")


def read_frames(source: str | os.PathLike, *, format: str | None = None,
                options: dict[str, str] | None = None) -> Iterator[Frame]:
    """The frames of the first video stream of `source` (a file, or what FFmpeg opens with `format` and
    `options`, e.g. "/dev/video0" with format="v4l2", or an RTSP URL), decoded to upright 8-bit RGB. A
    source that cannot be opened or decoded raises VideoError naming it and the frames read before."""
    av, name, done = pyav(), str(source), 0
    if Path(name).is_symlink() and not Path(name).exists():
        raise VideoError(f"{name}: is a broken symbolic link (to {os.readlink(name)}); fix or remove the link")
    if Path(name).is_dir():
        raise VideoError(f"{name}: is a folder, not a video file")
    try:
        with av.open(name, format=format, options=options or {}) as container:
            if not container.streams.video:
                raise VideoError(f"{name}: holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame threads: decoding keeps up with the device
            rate = stream.average_rate or stream.guessed_rate
            for frame in container.decode(stream):
                time = frame.time if frame.pts is not None else (done / rate if rate else None)
                yield Frame(done, None if time is None else float(time),
                            upright(frame.to_ndarray(format="rgb24"), frame.rotation), frame.pts)
                done += 1
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as err:
        raise _failed(name, err, done) from None


def probe(path: str) -> VideoInfo:
    """A video's size (upright, from its first frame), frame count and rate; VideoError if it cannot be
    read or has no frame P-Net can look at."""
    av = pyav()
    frames = read_frames(path)
    try:
        first = next(frames, None)
    finally:
        frames.close()
    if first is None:
        raise VideoError(f"{path}: no frame could be decoded; the file is empty, truncated or corrupt")
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            seconds = (float(stream.duration * stream.time_base) if stream.duration
                       else container.duration / 1e6 if container.duration else 0.0)  # microseconds
            count = stream.frames or (round(seconds * rate) if rate else 0)
            time_base = stream.time_base
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise _failed(path, err) from None
    h, w = first.pixels.shape[:2]
    least = INPUT_SIZE["pnet"]
    if min(h, w) < least:
        raise VideoError(f"{path}: {w}x{h} frames are under MTCNN's {least}-pixel window")
    return VideoInfo(path, h, w, int(count), Fraction(rate) if rate else None, time_base)


# ---------------------------------------------------------------------------------------------- encoding

def _encoder(suffix: str) -> str:
    """The first encoder of DRAW_CODECS[suffix] this FFmpeg build has."""
    av = pyav()
    for name in DRAW_CODECS[suffix]:
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.error.FFmpegError, ValueError):  # UnknownCodecError: not in this build
            continue
    raise VideoError(f"this FFmpeg build has none of the encoders {', '.join(DRAW_CODECS[suffix])} for {suffix} videos")


class VideoWriter:
    """An annotated copy of a video: its frames encoded at the input's frame rate and time stamps (AVI,
    which has none, at its frame rate), with the encoder `DRAW_CODECS` gives its suffix."""

    def __init__(self, path: Path, info: VideoInfo):
        self.path, self.info, self.stream = path, info, None
        self.codec = _encoder(path.suffix.lower())
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = pyav().open(str(path), "w")

    def _open(self, h: int, w: int, timed: bool) -> None:
        rate = self.info.rate or DEFAULT_RATE
        self.stream = self.container.add_stream(self.codec, rate=rate)
        self.stream.height, self.stream.width = h, w
        # x264 and VP9 take odd sizes only without chroma subsampling
        self.stream.pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 or self.codec == "mpeg4" else "yuv444p"
        self.stream.options = ENCODER_OPTIONS.get(self.codec, {})
        if self.codec == "mpeg4":
            self.stream.bit_rate = max(int(h * w * float(rate) * 0.3), 1_000_000)  # its default is 200 kb/s
        self.timed = timed
        self.stream.codec_context.time_base = self.info.time_base if timed else 1 / rate

    def write(self, frame: Frame, pixels_HxWx3: np.ndarray) -> None:
        """Encode one frame (the drawing of `frame`) at `frame`'s time stamp."""
        av = pyav()
        if self.stream is None:
            timed = frame.pts is not None and self.info.time_base is not None and self.path.suffix.lower() != ".avi"
            self._open(*pixels_HxWx3.shape[:2], timed)
        out = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels_HxWx3), format="rgb24")
        out.pts = frame.pts if self.timed and frame.pts is not None else frame.index
        out.time_base = self.stream.codec_context.time_base
        self.container.mux(self.stream.encode(out))

    def close(self) -> None:
        """Flush the encoder and write the container's index (the file is playable after this)."""
        try:
            if self.stream is not None:
                self.container.mux(self.stream.encode())
        finally:
            self.container.close()


def drawn_name(rel: PurePath) -> PurePath:
    """A drawn video's name in a --draw folder: the same for a container --draw writes, else as .mp4."""
    return rel if rel.suffix.lower() in DRAW_CODECS else rel.with_suffix(".mp4")
