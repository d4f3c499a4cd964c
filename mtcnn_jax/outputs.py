"""What the detect command line writes, written so that no work is lost and nothing is overwritten.

- `ResultsJson`: the results file, valid JSON after every image ({path: entry}, one entry a line: each new
  entry is written over the closing brace, which is written again after it), so a run stopped at image
  900 keeps the 899 before it.
- `mirror_paths`: output files (drawings, aligned crops) that mirror the inputs' paths relative to the
  deepest folder holding them all, renamed where two would collide (x.png and x.bmp both drawn as PNG,
  a/x.jpg and b/x.jpg given as files), so no output overwrites another.
- `write_crops`: one image's aligned crops, `{its mirrored path}_{k}.png` per face.
- `check_json_target`, `check_folder_target`, `check_crops_target`: an output path refused before any image is read (a folder
  where a file is wanted, an unwritable place, files that exist, unless overwriting was asked for).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePath
from typing import Any, Callable, Sequence

from PIL import Image

from mtcnn_jax import cli


def relative_paths(files: Sequence[str | os.PathLike]) -> list[PurePath]:
    """Each file's path relative to the deepest folder that holds all of them (paths as given, made
    absolute without resolving links)."""
    absolute = [Path(os.path.abspath(f)) for f in files]
    try:
        root = Path(os.path.commonpath([p.parent for p in absolute])) if absolute else Path()
    except ValueError:  # different drives: keep the whole path below each anchor
        return [PurePath(p.relative_to(p.anchor)) for p in absolute]
    return [PurePath(p.relative_to(root)) for p in absolute]


def mirror_paths(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 rename: Callable[[PurePath], PurePath] = lambda rel: rel) -> list[Path]:
    """One distinct path under `out_dir` per file: its relative path (`relative_paths`) passed through
    `rename` (e.g. a new suffix), with "-2", "-3", ... added to the name of any that would repeat an
    earlier one (compared without case, for case-insensitive file systems)."""
    taken: set[str] = set()
    out = []
    for rel in relative_paths(files):
        name = candidate = rename(rel)
        k = 1
        while str(candidate).lower() in taken:
            k += 1
            candidate = name.with_name(f"{name.stem}-{k}{name.suffix}")
        taken.add(str(candidate).lower())
        out.append(Path(out_dir) / candidate)
    return out


def drawing_name(rel: PurePath) -> PurePath:
    """An annotated copy's name: the same name for JPEG and PNG, else the name as .png."""
    return rel if rel.suffix.lower() in (".jpg", ".jpeg", ".png") else rel.with_suffix(".png")


def _refuse_existing(existing: Sequence[Path], what: str) -> None:
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise cli.CliError(f"{what} would overwrite {existing[0]}{more}: pass --overwrite to replace "
                           "it, or choose another name")


def check_json_target(path: str | os.PathLike, flag: str, overwrite: bool) -> Path:
    """`path` if the results file can be written there: not a folder, its folder exists or can be made,
    and no file there unless `overwrite`; else CliError."""
    target = cli.output_file(path, flag)
    if target.exists() or target.is_symlink():
        if not overwrite:
            _refuse_existing([target], f"{flag} {path}")
        if not os.access(target, os.W_OK):
            raise cli.CliError(f"{flag} {path}: not writable")
    return target


def check_folder_target(folder: str | os.PathLike, targets: Sequence[Path], flag: str, overwrite: bool) -> Path:
    """`folder` if every target file under it can be written: the folder (and each target's folder) is a
    folder or can be made, and no target exists unless `overwrite`; else CliError."""
    out = cli.output_dir(folder, flag)
    for parent in dict.fromkeys(t.parent for t in targets):
        cli.output_dir(parent, flag)
    if not overwrite:
        _refuse_existing([t for t in targets if t.exists() or t.is_symlink()], f"{flag} {folder}")
    return out


def crop_base(rel: PurePath) -> PurePath:
    """Where an image's aligned crops go: its relative path without the suffix; face k is `{base}_{k}.png`."""
    return rel.with_suffix("")


def _crop_files(base: Path) -> list[Path]:
    """The crop files of one image that exist under `base` (`{base.name}_{k}.png`)."""
    pattern = re.compile(re.escape(base.name) + r"_\d+\.png")
    return sorted(p for p in base.parent.glob(base.name + "_*.png") if pattern.fullmatch(p.name)) \
        if base.parent.is_dir() else []


def check_crops_target(folder: str | os.PathLike, bases: Sequence[Path], flag: str, overwrite: bool) -> Path:
    """`folder` if every image's crops can be written under it (`check_folder_target`), none of them there
    from before unless `overwrite`; else CliError."""
    out = check_folder_target(folder, [b.with_name(b.name + "_0.png") for b in bases], flag, overwrite=True)
    if not overwrite:
        _refuse_existing([f for b in bases for f in _crop_files(b)], f"{flag} {folder}")
    return out


def write_crops(base: Path, crops_Kxhxwx3: Any) -> list[str]:
    """Save one image's aligned crops as `{base}_{k}.png` (lossless), replacing crops of an earlier run of
    this image; the paths written."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for old in _crop_files(base):
        old.unlink()
    paths = [base.with_name(f"{base.name}_{k}.png") for k in range(len(crops_Kxhxwx3))]
    for path, crop in zip(paths, crops_Kxhxwx3):
        Image.fromarray(crop).save(path)
    return [str(p) for p in paths]


def write_drawing(target: Path, drawing: Any) -> None:
    """Save an annotated copy (a PIL image) at `target`, making its folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    drawing.save(target, quality=92)  # PNG ignores the JPEG quality


class ResultsJson:
    """A JSON object file written one entry at a time and valid after each (see the module docstring);
    path None writes nothing. Use as a context manager; `add(key, value)` writes and flushes one entry."""

    def __init__(self, path: str | os.PathLike | None):
        self.path, self._file, self.count = path and Path(path), None, 0
        self._end = 1  # where the next entry goes: just after "{" or the last entry
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")
            self._file.write(b"{\n}\n")
            self._file.flush()

    def add(self, key: str, value: Any) -> None:
        """Write `key: value` in place of the closing brace, then the brace again, and flush."""
        if self._file is None:
            return
        entry = (b",\n" if self.count else b"\n") + f"{json.dumps(key)}: {json.dumps(value)}".encode()
        self._file.seek(self._end)
        self._file.write(entry)
        self._end += len(entry)
        self._file.write(b"\n}\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "ResultsJson":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
