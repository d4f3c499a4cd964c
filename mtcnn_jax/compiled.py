"""The compiled cascade of each (bucket, batch size): export, compile once, run, and compile ahead.

`compiled_cascade` runs the cascade's stages (`cascade.run_stages`) as programs compiled ahead of time
(`stage_chain`): those that read the image once per bucket, batch size, config and last stage, those that
see only candidates once for every bucket of the same slots. Each is exported (`jax.export`, so any weights
of the same shapes run in it) and compiled once per process, and through `compile_cache` once per machine.
`detect_bucket` runs a padded batch through them; `CompileAhead` compiles the shapes a planned folder needs
(`buckets.plan`) on a background thread while the shapes already compiled run. `redetect_bucket` runs
`cascade.redetect_fn` (R-Net and O-Net around the faces of a previous video frame) the same way, sharing
the R-Net and O-Net programs. `export_cascade` exports the whole cascade of a bucket as one program.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mtcnn_jax import compile_cache
from mtcnn_jax.buckets import Bucket, bucket_capacities
from mtcnn_jax.cascade import (REDETECT, REDETECT_FACES, REDETECT_OFFSETS, cascade_fn, run_stages, shared_slots,
                              stage_functions, table_slot)
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.pyramid import PyramidPlan, image_plan
from mtcnn_jax.stages import INPUT_SIZE, STAGES


def compiler_options(platform: str | None = None) -> dict[str, Any]:
    """The XLA options the cascade compiles with on `platform` (default: this machine's backend): XLA:CPU's
    newer fusion emitters compile this graph about 1.5x slower for no run-time gain (benchmarks/README.md);
    other backends get their defaults."""
    return {"xla_cpu_use_fusion_emitters": False} if (platform or jax.default_backend()) == "cpu" else {}


def _struct(a: Any, shape: tuple | None = None) -> jax.ShapeDtypeStruct:
    """`a`'s shape (or `shape`) and its dtype as JAX holds it (host int64 arrays become int32 without x64)."""
    return jax.ShapeDtypeStruct(np.shape(a) if shape is None else shape, jax.dtypes.canonicalize_dtype(a.dtype))


def bucket_arguments(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig) -> tuple:
    """The shapes and dtypes (`jax.ShapeDtypeStruct`s) of `cascade_fn`'s arguments for one bucket."""
    batched = lambda a: _struct(a, (batch, *np.shape(a)[1:]))  # noqa: E731
    one_image = image_plan(np.array([bucket_hw], np.int32), bucket_hw, config)  # per-image shapes, batch 1
    images = jax.ShapeDtypeStruct((batch, *bucket_hw, 3), np.uint8)
    sizes = jax.ShapeDtypeStruct((batch, 2), np.int32)
    plan = PyramidPlan.of(*bucket_hw, config)
    return (jax.tree_util.tree_map(_struct, params), images, sizes, *jax.tree_util.tree_map(batched, one_image),
            *jax.tree_util.tree_map(_struct, plan.cells))


def redetect_arguments(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig) -> tuple:
    """The shapes and dtypes of `redetect_fn`'s arguments for one bucket: the previous faces in
    `cascade.REDETECT_FACES` slots per image."""
    return (jax.tree_util.tree_map(_struct, params), jax.ShapeDtypeStruct((batch, *bucket_hw, 3), np.uint8),
            jax.ShapeDtypeStruct((batch, 2), np.int32), jax.ShapeDtypeStruct((batch, REDETECT_FACES, 4), np.float32),
            jax.ShapeDtypeStruct((batch, REDETECT_FACES), np.bool_))


def _export(arguments: tuple, fn: Callable, platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """`fn` (its config bound) exported for these argument shapes."""
    return jax.export.export(jax.jit(fn), platforms=platforms)(*arguments)


def export_cascade(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig = CascadeConfig(),
                   upto: str = "onet", platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """The whole cascade of one bucket and batch size as one `jax.export.Exported` (StableHLO with a stable
    calling convention; params are arguments, so any weights of these shapes run in it), lowered for
    `platforms` (default: this machine's backend). It holds every program `compiled_cascade` runs."""
    fn = functools.partial(cascade_fn, config=config, upto=upto)
    return _export(bucket_arguments(params, bucket_hw, batch, config), fn, platforms)


def stage_chain(bucket_hw: tuple[int, int], config: CascadeConfig, upto: str) -> list[tuple]:
    """The programs `compiled_cascade` runs in a row, as (stage, shape): the shape is what the stage's
    arrays depend on besides the batch size and config: the bucket for the stages that read the images, the
    crop sources' `table_slot` (and the candidates' slots) for the crops, the slots for P-Net's NMS and R-Net,
    nothing for O-Net and re-detection's candidates. So a new bucket of seen slots compiles only its P-Net
    program and its crop sources'."""
    window_capacity, pnet_capacity = bucket_capacities(config, *bucket_hw)
    if upto == REDETECT:
        candidates, chain = REDETECT_FACES * len(REDETECT_OFFSETS), [(REDETECT, ())]
    else:
        candidates = shared_slots(pnet_capacity)
        chain = [("pnet", tuple(bucket_hw)), ("pnet_nms", (shared_slots(window_capacity), candidates))]
    if upto != "pnet":
        slot = table_slot(bucket_hw)
        chain += [("sources", tuple(bucket_hw)), ("rnet_crops", (slot, candidates)),
                  ("rnet", (shared_slots(candidates),))]
    if upto not in ("pnet", "rnet"):
        chain += [("onet_crops", slot), ("onet", ())]
    return chain


_compiled: dict[tuple, Future] = {}  # (stage, shape, batch, config, params signature) -> its program
_runners: dict[tuple, Callable] = {}  # (bucket, batch, config, upto, params signature) -> `compiled_cascade`
_compiled_lock = threading.Lock()


def _params_signature(params: dict) -> tuple:
    return tuple((jax.tree_util.keystr(path), tuple(a.shape), str(a.dtype))
                 for path, a in jax.tree_util.tree_leaves_with_path(params))


def compiled_cascade(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig = CascadeConfig(),
                     upto: str = "onet") -> Callable:
    """The cascade of one bucket, batch size and config stopping after stage `upto` (or `REDETECT`), compiled,
    called as `cascade.cascade_fn` (or `redetect_fn`) without the config. It runs the programs of
    `stage_chain` one after another, each compiled once per process (threads asking for one program wait
    for one compile; different programs compile concurrently) and, through `compile_cache`, once per
    machine: a later process loads their executables from the user's cache folder."""
    bucket_hw, signature = tuple(bucket_hw), _params_signature(params)
    with _compiled_lock:
        run = _runners.get((bucket_hw, batch, config, upto, signature))
    if run is not None:
        return run
    programs, fns = {}, stage_functions(config, bucket_hw)

    def compile_stage(stage: str, shape: tuple) -> Callable:
        def describe(*arguments):  # compiles the stage for these argument shapes; returns its output shapes
            programs[stage] = _program((stage, shape, batch, config, signature), fns[stage], arguments)
            return jax.tree_util.tree_map(_struct, programs[stage].out_info)
        return describe

    first = (redetect_arguments if upto == REDETECT else bucket_arguments)(params, bucket_hw, batch, config)
    run_stages({stage: compile_stage(stage, shape) for stage, shape in stage_chain(bucket_hw, config, upto)},
               *first[:3], first[3:], upto)  # traces nothing: each stage is compiled from its arguments' shapes
    run = lambda params, images, sizes, *rest: run_stages(programs, params, images, sizes, rest, upto)  # noqa: E731
    with _compiled_lock:
        return _runners.setdefault((bucket_hw, batch, config, upto, signature), run)


def _program(key: tuple, fn: Callable, arguments: tuple) -> jax.stages.Compiled:
    """`fn`, the stage of `key`, compiled for these argument shapes, once per process."""
    with _compiled_lock:
        future, owner = _compiled.get(key), False
        if future is None:
            future, owner = _compiled.setdefault(key, Future()), True
    if owner:
        try:
            future.set_result(_compile(key, fn, arguments))
        except BaseException as err:
            with _compiled_lock:
                del _compiled[key]
            future.set_exception(err)
    return future.result()


def is_compiled(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig = CascadeConfig(),
                upto: str = "onet") -> bool:
    """Whether `compiled_cascade` of this shape needs no compile: each of its programs compiled (or compiling)
    in this process, or its executable stored in the compile cache."""
    signature = _params_signature(params)
    keys = [(stage, shape, batch, config, signature) for stage, shape in stage_chain(bucket_hw, config, upto)]
    with _compiled_lock:
        keys = [key for key in keys if key not in _compiled]
    return all(compile_cache.has_executable(_executable_key(key)) for key in keys)


def _executable_key(key: tuple) -> str:
    return f"stage|{key!r}|{compiler_options()!r}"


def _compile(key: tuple, fn: Callable, arguments: tuple) -> jax.stages.Compiled:
    """The stored executable of a stage key, else `fn` exported (or its stored export loaded) and compiled
    ahead of time for these argument shapes."""
    def build() -> jax.stages.Compiled:
        exp, _ = compile_cache.exported(f"stage|{key!r}", lambda: _export(arguments, fn))
        return jax.jit(exp.call, compiler_options=compiler_options()).lower(*arguments).compile()

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
