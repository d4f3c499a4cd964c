"""How every command line of the project ends: its exit code, or one `error:` line, never a traceback.

`@cli.entry("python -m mtcnn_jax.X")` wraps a `main(argv) -> int | None`: an expected failure (bad input,
a missing or unreadable file, `CliError`) prints `PROG: error: MESSAGE` and exits 2; an unexpected one
(a bug) prints its type and message with the hint to set MTCNN_JAX_TRACEBACK=1 for the traceback and
exits 1; Ctrl-C exits 130 after the command's own cleanup has run. Below it, the checks the CLIs share so
that a bad path is refused before any work: input and output path checks.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

TRACEBACK_VARIABLE = "MTCNN_JAX_TRACEBACK"
INTERRUPTED = 130  # the shell's code for SIGINT


class CliError(Exception):
    """A failure the user can fix, said in one line (the message names the file or flag and the fix)."""


# What users meet through their own inputs: files, paths, values (a KeyError or TypeError is a bug).
EXPECTED = (CliError, ValueError, OSError)

Main = Callable[[Sequence[str] | None], "int | None"]


def _message(err: BaseException) -> str:
    """What an exception says: a KeyError's key without its quotes, the type when it says nothing."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text.strip() or type(err).__name__


def _say(prog: str, message: str) -> None:
    """The message's first line (a library's long message is cut, with where to see all of it)."""
    first, *rest = str(message).strip().splitlines() or [""]
    more = f" [{len(rest)} more lines: set {TRACEBACK_VARIABLE}=1]" if rest else ""
    print(f"{prog}: error: {first}{more}", file=sys.stderr)


def entry(prog: str) -> Callable[[Main], Callable[[Sequence[str] | None], int]]:
    """Decorator for a CLI's main: its return value (None -> 0) or one `error:` line and a non-zero code."""

    def wrap(main: Main) -> Callable[[Sequence[str] | None], int]:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> int:
            try:
                return int(main(argv) or 0)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return INTERRUPTED
            except SystemExit:
                raise  # argparse's usage errors and --help: already one line
            except EXPECTED as err:
                if os.environ.get(TRACEBACK_VARIABLE):
                    raise
                _say(prog, _message(err))
                return 2
            except Exception as err:  # a bug: still one line, and how to see more
                if os.environ.get(TRACEBACK_VARIABLE):
                    raise
                _say(prog, f"{type(err).__name__}: {_message(err)} (set {TRACEBACK_VARIABLE}=1 to see the traceback)")
                return 1

        return run

    return wrap


# ------------------------------------------------------------------------ checks shared by the CLIs


def existing_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` if it is a folder, else CliError naming the flag."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CliError(f"{flag} {path}: no such folder")
    if not path.is_dir():
        raise CliError(f"{flag} {path}: not a folder")
    return path


def existing_file(path: str | os.PathLike, flag: str, *, empty_ok: bool = False) -> Path:
    """`path` if it is a readable (and, unless empty_ok, non-empty) file, else CliError naming the flag."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CliError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise CliError(f"{flag} {path}: not a file")
    if not os.access(path, os.R_OK):
        raise CliError(f"{flag} {path}: not readable")
    if not empty_ok and path.stat().st_size == 0:
        raise CliError(f"{flag} {path}: empty file")
    return path


def _creatable(path: Path, flag: str) -> None:
    """CliError unless the nearest existing folder above `path` is a writable folder."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {path}: cannot write in {parent}")


def output_file(path: str | os.PathLike, flag: str) -> Path:
    """`path` if a file can be written there (not a folder; its folder exists or can be made), else CliError."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CliError(f"{flag} {path}: is a folder, expected a file name")
    _creatable(path, flag)
    return path


def output_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` if a folder can be written there (an existing folder or a new one), else CliError."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"{flag} {path}: is a file, expected a folder")
    _creatable(path / "_" if path.is_dir() else path, flag)
    return path
