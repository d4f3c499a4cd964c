"""Compile once per machine: where compiled cascades are kept between processes.

Three stores in one folder (default: `compiled/` in the user cache folder beside the weights,
`pretrained.cache_dir()`), all keyed so that a change of code, JAX or machine never reuses an entry:
- `executables/`: each bucket's compiled cascade, loaded by a later process without tracing, lowering
  or hashing its program (`executable`): a seen bucket costs only the executable's load.
- `exports/`: each bucket's cascade as a serialized `jax.export.Exported`, so that a process that must
  compile (another machine sharing the folder, a cleared executable) does not trace it again.
- JAX's persistent compilation cache (`xla/`): XLA executables, for every other jit of the process.

`$MTCNN_JAX_COMPILE_CACHE` (a folder, or `off`) and the CLIs' `--compile-cache` move or disable it.
A folder the user already gave JAX (`jax_compilation_cache_dir`) is respected.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import pickle
import platform
import shutil
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from mtcnn_jax.pretrained import cache_dir

ENV = "MTCNN_JAX_COMPILE_CACHE"
OFF = ("off", "none", "0", "false", "no")
XLA_MAX_BYTES = 2 * 2**30  # JAX evicts its least recently used executables beyond this
STALE_DAYS = 30  # exports of other code versions unused this long are deleted
_PACKAGE = Path(__file__).resolve().parent

_state: dict[str, Path | None] = {}  # "folder": the configured folder (None: disabled), once configured
_lock = threading.Lock()


def _as_folder(value: str | os.PathLike | None) -> Path | None:
    """A folder as the user wrote it: None, or one of OFF, means none."""
    if value is None or str(value).strip().lower() in OFF:
        return None
    return Path(value).expanduser()


def default_folder() -> Path | None:
    """$MTCNN_JAX_COMPILE_CACHE (None when it says off), else `compiled/` in the user cache folder."""
    value = os.environ.get(ENV, "").strip()
    return _as_folder(value) if value else cache_dir() / "compiled"


def add_flag(parser: argparse.ArgumentParser) -> None:
    """The `--compile-cache DIR|off` flag of every CLI that runs the cascade (pass its value to `configure`)."""
    parser.add_argument("--compile-cache", default="default", metavar="DIR|off",
                        help=f"where compiled cascade buckets are kept for later runs (default: ${ENV}, else "
                             "compiled/ in the user cache folder beside the weights); off: keep nothing")


def configure(folder: str | os.PathLike | None = "default") -> Path | None:
    """Use `folder` for compiled cascades and JAX's persistent cache ("default": `default_folder()`,
    None or "off": keep nothing on disk). Returns the folder in use. Call before the first compile,
    or it applies from the next compile on."""
    path = default_folder() if folder == "default" else _as_folder(folder)
    with _lock:
        if path is not None:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(f"compile cache folder {path} cannot be created ({err.strerror})") from None
            jax.config.update("jax_compilation_cache_dir", str(path / "xla"))
            jax.config.update("jax_compilation_cache_max_size", XLA_MAX_BYTES)
            # Cache every cascade compile, however short (JAX's default skips those under 1 s).
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            for store in ("exports", "executables"):
                _prune(path / store)
        else:
            jax.config.update("jax_compilation_cache_dir", None)
        jax_cache.reset_cache()  # JAX decides once per process whether its cache is on: decide again
        _state["folder"] = path
        return path


def folder() -> Path | None:
    """The folder in use, configuring the default on first use (a folder already given to JAX wins
    for its executables; the exports then go beside it)."""
    if "folder" not in _state:
        user = jax.config.jax_compilation_cache_dir
        if user:
            _state["folder"] = Path(user)
        else:
            configure("default")
    return _state["folder"]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A digest of this package's source and of the JAX build: an export made by other code is never used."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    for dist in ("jax", "jaxlib"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:16]


def _entry(store: str, suffix: str, key: str) -> Path | None:
    """The file `store` keeps `key` in (a digest + suffix, in the folder of this code's fingerprint); None
    without a cache folder."""
    where = folder()
    if where is None:
        return None
    return where / store / code_fingerprint() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}{suffix}"


def _stored(store: str, suffix: str, key: str, build: Callable[[], Any], load: Callable[[bytes], Any],
            dump: Callable[[Any], bytes | None]) -> tuple[Any, bool]:
    """What `store` holds under `key` (a digest + suffix, in the folder of this code's fingerprint), read by `load`,
    else `build()`, written by `dump` (None: not kept). Returns it and whether it came from disk. A damaged
    entry (truncated, foreign) is rebuilt; without a cache folder nothing is read or kept."""
    path = _entry(store, suffix, key)
    if path is None:
        return build(), False
    if path.is_file():
        try:
            value = load(path.read_bytes())
        except Exception:  # a truncated or foreign file: rebuilt below
            value = None
        if value is not None:
            _touch(path.parent)
            return value, True
    value = build()
    data = dump(value)
    if data is not None:
        _write_atomically(path, data)
    return value, False


def exported(key: str, build: Callable[[], jax.export.Exported]) -> tuple[jax.export.Exported, bool]:
    """The export stored under `key` (with the code fingerprint and backend) if there is one, else
    `build()`, stored for next time. Returns it and whether it came from disk."""
    return _stored("exports", ".jaxexport", f"{jax.default_backend()}|{key}", build,
                   lambda data: jax.export.deserialize(bytearray(data)), lambda exp: exp.serialize())


@functools.lru_cache(maxsize=1)
def machine_fingerprint() -> str:
    """The backend, its devices and (on CPU) the processor's instruction set: an executable holds native
    code for them, so a cache folder shared between machines never hands one to the wrong machine."""
    client = jax.devices()[0].client
    parts = [client.platform, client.platform_version, *sorted({d.device_kind for d in jax.devices()})]
    if client.platform == "cpu":
        parts.append(platform.machine())
        try:
            flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")]
            parts.append(flags[0] if flags else "")
        except OSError:
            parts.append(platform.processor())
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def executable(key: str, build: Callable[[], jax.stages.Compiled]) -> tuple[jax.stages.Compiled, bool]:
    """The compiled program stored under `key` (with the code and machine fingerprints) if there is one,
    else `build()`, stored for next time. Returns it and whether it came from disk."""
    hits = _xla_cache_hits()

    def dump(compiled: jax.stages.Compiled) -> bytes | None:
        if _xla_cache_hits() != hits:  # an executable JAX read from its own cache serializes incomplete
            return None
        return pickle.dumps(serialize_executable.serialize(compiled))

    # Our own cache folder: its executables are native code run as is, so unpickling them adds no trust.
    return _stored("executables", ".xla", _executable_key(key), build,
                   lambda data: serialize_executable.deserialize_and_load(*pickle.loads(data)), dump)


def has_executable(key: str) -> bool:
    """Whether `executable(key, ...)` would load a stored program rather than build one (a damaged file
    still counts: it is found out when loaded)."""
    path = _entry("executables", ".xla", _executable_key(key))
    return path is not None and path.is_file()


def _executable_key(key: str) -> str:
    return f"{machine_fingerprint()}|{key}"


_this_thread = threading.local()  # JAX reports a cache hit in the thread that compiles


def _count_hit(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _this_thread.hits = getattr(_this_thread, "hits", 0) + 1


jax.monitoring.register_event_listener(_count_hit)


def _xla_cache_hits() -> int:
    """Executables this thread has read from JAX's persistent cache so far."""
    return getattr(_this_thread, "hits", 0)


def _touch(folder: Path) -> None:
    """Mark a code version's folder in a store as used now (`_prune` reads its time)."""
    try:
        os.utime(folder)
    except OSError:
        pass


def _prune(store: Path) -> None:
    """Delete a store's folders of other code versions not used for STALE_DAYS (best effort)."""
    try:
        for old in store.iterdir():
            if old.name != code_fingerprint() and time.time() - old.stat().st_mtime > STALE_DAYS * 86400:
                shutil.rmtree(old, ignore_errors=True)
    except OSError:
        pass


def _write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary file and a rename, so a concurrent or killed process never leaves half a file.
    A read-only or full disk only costs the saving, never the run."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _touch(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
