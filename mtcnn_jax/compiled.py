"""The compiled cascade of each (bucket, batch size): export, compile once, run, and compile ahead.

`cascade.cascade_fn` is exported (`jax.export`, so any weights of the same shapes run in it) and compiled
ahead of time once per process for each bucket, batch size, config and last stage (`compiled_cascade`),
and through `compile_cache` once per machine. `detect_bucket` runs a padded batch through it;
`CompileAhead` compiles the shapes a planned folder needs (`buckets.plan`) on a background thread while
the shapes already compiled run. `redetect_bucket` runs `cascade.redetect_fn` (R-Net and O-Net around
the faces of a previous video frame), compiled and kept the same way.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from mtcnn_jax import compile_cache
from mtcnn_jax.buckets import Bucket
from mtcnn_jax.cascade import REDETECT_FACES, cascade_fn, redetect_fn
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.pyramid import PyramidPlan, image_plan
from mtcnn_jax.stages import INPUT_SIZE, STAGES


def compiler_options(platform: str | None = None) -> dict[str, Any]:
    """The XLA options the cascade compiles with on `platform` (default: this machine's backend): XLA:CPU's
    newer fusion emitters compile this graph about 1.5x slower for no run-time gain (benchmarks/README.md);
    other backends get their defaults."""
    return {"xla_cpu_use_fusion_emitters": False} if (platform or jax.default_backend()) == "cpu" else {}


def bucket_arguments(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig) -> tuple:
    """The shapes and dtypes (`jax.ShapeDtypeStruct`s) of `cascade_fn`'s arguments for one bucket."""
    struct = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)  # noqa: E731
    batched = lambda a: jax.ShapeDtypeStruct((batch, *np.shape(a)[1:]), a.dtype)  # noqa: E731
    one_image = image_plan(np.array([bucket_hw], np.int32), bucket_hw, config)  # per-image shapes, batch 1
    images = jax.ShapeDtypeStruct((batch, *bucket_hw, 3), np.uint8)
    sizes = jax.ShapeDtypeStruct((batch, 2), np.int32)
    plan = PyramidPlan.of(*bucket_hw, config)
    return (jax.tree_util.tree_map(struct, params), images, sizes, *jax.tree_util.tree_map(batched, one_image),
            *jax.tree_util.tree_map(struct, plan.cells))


def export_cascade(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig = CascadeConfig(),
                   upto: str = "onet", platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """The cascade of one bucket and batch size as a `jax.export.Exported` (StableHLO with a stable
    calling convention; params are arguments, so any weights of these shapes run in it), lowered for
    `platforms` (default: this machine's backend)."""
    return _export(bucket_arguments(params, bucket_hw, batch, config), config, upto, platforms)


def redetect_arguments(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig) -> tuple:
    """The shapes and dtypes of `redetect_fn`'s arguments for one bucket: the previous faces in
    `cascade.REDETECT_FACES` slots per image."""
    struct = lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype)  # noqa: E731
    return (jax.tree_util.tree_map(struct, params), jax.ShapeDtypeStruct((batch, *bucket_hw, 3), np.uint8),
            jax.ShapeDtypeStruct((batch, 2), np.int32), jax.ShapeDtypeStruct((batch, REDETECT_FACES, 4), np.float32),
            jax.ShapeDtypeStruct((batch, REDETECT_FACES), np.bool_))


class Program(NamedTuple):
    """A jitted program of the package: its function (called with `config=`) and its argument shapes."""
    fn: Callable
    arguments: Callable[[dict, tuple[int, int], int, CascadeConfig], tuple]


REDETECT = "redetect"  # the re-detection program (video), beside the cascade stopping after each stage
PROGRAMS: dict[str, Program] = {
    **{stage: Program(functools.partial(cascade_fn, upto=stage), bucket_arguments) for stage in STAGES},
    REDETECT: Program(redetect_fn, redetect_arguments),
}


def _export(arguments: tuple, config: CascadeConfig, program: str,
            platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """`PROGRAMS[program]` exported for these argument shapes."""
    fn = functools.partial(PROGRAMS[program].fn, config=config)
    return jax.export.export(jax.jit(fn), platforms=platforms)(*arguments)


_compiled: dict[tuple, Future] = {}
_compiled_lock = threading.Lock()


def _params_signature(params: dict) -> tuple:
    return tuple((jax.tree_util.keystr(path), tuple(a.shape), str(a.dtype))
                 for path, a in jax.tree_util.tree_leaves_with_path(params))


def compiled_cascade(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig = CascadeConfig(),
                     upto: str = "onet") -> Callable:
    """The compiled program `PROGRAMS[upto]` (the cascade stopping after stage `upto`, or `REDETECT`) of one
    bucket, batch size and config, called as its function without the config. Compiled once per process
    (threads asking for one bucket wait for one compile; different buckets compile concurrently) and,
    through `compile_cache`, once per machine: a later process loads its executable from the user's cache
    folder."""
    bucket_hw = tuple(bucket_hw)
    key = _key(params, bucket_hw, batch, config, upto)
    with _compiled_lock:
        future, owner = _compiled.get(key), False
        if future is None:
            future, owner = _compiled.setdefault(key, Future()), True
    if owner:
        try:
            arguments = PROGRAMS[upto].arguments(params, bucket_hw, batch, config)
            future.set_result(_compile(key, arguments))
        except BaseException as err:
            with _compiled_lock:
                del _compiled[key]
            future.set_exception(err)
    return future.result()


def is_compiled(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig = CascadeConfig(),
                upto: str = "onet") -> bool:
    """Whether `compiled_cascade` of this shape needs no compile: compiled (or compiling) in this process,
    or its executable stored in the compile cache."""
    key = _key(params, bucket_hw, batch, config, upto)
    with _compiled_lock:
        if key in _compiled:
            return True
    return compile_cache.has_executable(_executable_key(key))


def _key(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig, upto: str) -> tuple:
    return tuple(bucket_hw), batch, config, upto, _params_signature(params)


def _executable_key(key: tuple) -> str:
    return f"cascade|{key!r}|{compiler_options()!r}"


def _compile(key: tuple, arguments: tuple) -> Callable:
    """The stored executable of `compiled_cascade`'s key, else the cascade exported (or its stored export
    loaded) and compiled ahead of time for these argument shapes."""
    _, _, config, upto, _ = key
    options = compiler_options()

    def build() -> jax.stages.Compiled:
        exp, _ = compile_cache.exported(f"cascade|{key!r}", lambda: _export(arguments, config, upto))
        return jax.jit(exp.call, compiler_options=options).lower(*arguments).compile()

    return compile_cache.executable(_executable_key(key), build)[0]


def detect_bucket(params: dict, images_BxHxWx3: np.ndarray, sizes_Bx2: np.ndarray,
                  config: CascadeConfig = CascadeConfig(), upto: str = "onet") -> dict:
    """Detect faces in a batch of images zero-padded (bottom/right) into one bucket.

    Returns numpy "boxes" (B, F, 4), "scores" (B, F), "landmarks" (B, F, 5, 2), "valid" (B, F) (valid
    rows first, by score) and "overflow": {stage: (B,) candidates dropped by a full capacity}.
    `upto="pnet"` or `"rnet"` stops after that stage (the candidates hard-example mining needs; no
    landmarks). Compiles once per (bucket height, bucket width, batch size, config, upto): see
    `compiled_cascade`.
    """
    images = np.asarray(images_BxHxWx3)
    sizes = np.asarray(sizes_Bx2, np.int32).reshape(-1, 2)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(sizes) != len(images):
        raise ValueError("detect_bucket needs uint8 images (B, H, W, 3) and their real sizes (B, 2)")
    hb, wb = images.shape[1:3]
    least = INPUT_SIZE["pnet"]
    if (sizes < least).any() or (sizes[:, 0] > hb).any() or (sizes[:, 1] > wb).any():
        raise ValueError(f"image sizes {sizes.tolist()} must be >= {least} and fit the bucket {hb}x{wb}")
    if upto not in STAGES:
        raise ValueError(f"upto must be one of {STAGES}, got {upto!r}")
    plan = PyramidPlan.of(hb, wb, config)
    if not plan.scales:
        raise ValueError(f"bucket {hb}x{wb} is too small for min_face_size={config.min_face_size}")
    level_hw, level_on, taps = image_plan(sizes, (hb, wb), config)
    run = compiled_cascade(params, (hb, wb), len(images), config, upto)
    out = run(params, images, sizes, level_hw, level_on, taps, *plan.cells)
    return jax.tree_util.tree_map(np.asarray, out)


def redetect_bucket(params: dict, images_BxHxWx3: np.ndarray, sizes_Bx2: np.ndarray, boxes: Sequence[np.ndarray],
                    config: CascadeConfig = CascadeConfig()) -> dict:
    """Re-detect the faces `boxes[b]` (each (K, 4), 1-based boxes of a previous frame, K <= REDETECT_FACES) in
    a batch of images padded into one bucket: `redetect_fn`'s R-Net and O-Net around them. Returns what
    `detect_bucket` does; compiled once per (bucket, batch size, config)."""
    images = np.asarray(images_BxHxWx3)
    sizes = np.asarray(sizes_Bx2, np.int32).reshape(-1, 2)
    if images.dtype != np.uint8 or images.ndim != 4 or len(sizes) != len(images) or len(boxes) != len(images):
        raise ValueError("redetect_bucket needs uint8 images (B, H, W, 3), their sizes (B, 2) and B box arrays")
    slots = np.zeros((len(images), REDETECT_FACES, 4), np.float32)
    valid = np.zeros((len(images), REDETECT_FACES), bool)
    for b, faces in enumerate(boxes):
        faces = np.asarray(faces, np.float32).reshape(-1, 4)
        if len(faces) > REDETECT_FACES:
            raise ValueError(f"re-detection follows at most {REDETECT_FACES} faces per image, got {len(faces)}")
        slots[b, : len(faces)], valid[b, : len(faces)] = faces, True
    run = compiled_cascade(params, images.shape[1:3], len(images), config, REDETECT)
    return jax.tree_util.tree_map(np.asarray, run(params, images, sizes, slots, valid))


class CompileAhead:
    """Compiles (bucket, batch size) shapes one after another on a background thread; `compiled_cascade`
    hands a shape to whoever asks first, so detection waits only for shapes not compiled yet and never
    compiles one twice. Failures are left for the detection of that shape to report. `on_change` gets
    the number of shapes still to compile whenever it changes."""

    def __init__(self, params: dict, shapes: Sequence[tuple[Bucket, int]], config: CascadeConfig,
                 upto: str = "onet", on_change: Callable[[int], Any] | None = None):
        unique = list(dict.fromkeys(shapes))
        self._left, self._on_change = len(unique), on_change or (lambda n: None)
        self._lock = threading.Lock()
        self._on_change(self._left)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtcnn-compile")
        for bucket, batch in unique:
            self._pool.submit(self._compile, params, bucket, batch, config, upto)

    def _compile(self, params: dict, bucket: Bucket, batch: int, config: CascadeConfig, upto: str) -> None:
        try:
            compiled_cascade(params, bucket, batch, config, upto)
        except Exception:  # the detection that needs this shape compiles it again and reports the error
            pass
        finally:
            with self._lock:
                self._left -= 1
                left = self._left
            self._on_change(left)

    @property
    def pending(self) -> int:
        """Shapes not compiled yet (queued or compiling)."""
        with self._lock:
            return self._left

    def close(self) -> None:
        """Drop the shapes not started; wait for the one compiling."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "CompileAhead":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
