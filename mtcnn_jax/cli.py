"""How every command line of the project ends: its exit code, or one `error:` line, never a traceback.

`@cli.entry("python -m mtcnn_jax.X")` wraps a `main(argv) -> int | None`: an expected failure (bad input,
a missing or unreadable file, `CliError`) prints `PROG: error: MESSAGE` and exits 2; an unexpected one
(a bug) prints its type and message with the hint to set MTCNN_JAX_TRACEBACK=1 for the traceback and
exits 1; Ctrl-C exits 130 after the command's own cleanup has run.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Sequence

TRACEBACK_VARIABLE = "MTCNN_JAX_TRACEBACK"
INTERRUPTED = 130  # the shell's code for SIGINT


class CliError(Exception):
    """A failure the user can fix, said in one line (the message names the file or flag and the fix)."""


# What users meet through their own inputs: files, paths, values.
EXPECTED = (CliError, ValueError, OSError, KeyError, TypeError)

Main = Callable[[Sequence[str] | None], "int | None"]


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
                _say(prog, str(err))
                return 2
            except Exception as err:  # a bug: still one line, and how to see more
                if os.environ.get(TRACEBACK_VARIABLE):
                    raise
                _say(prog, f"{type(err).__name__}: {err} (set {TRACEBACK_VARIABLE}=1 to see the traceback)")
                return 1

        return run

    return wrap
