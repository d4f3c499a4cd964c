"""Static compilation: the bucket ladder, batch plans, the stage programs buckets share, the compile cache
between processes, compiling ahead, and the cascade lowered for CUDA within a memory bound."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from hypothesis import given, settings
from hypothesis import strategies as st

from mtcnn_jax import buckets, cascade, compile_cache, compiled, nets
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.pyramid import PyramidPlan, image_plan

LADDER = (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


# ---- the ladder and the batch plan ----------------------------------------------------------------

def test_ladder_sides():
    sides = sorted({buckets.bucket_side(n) for n in range(1, 4097)})
    assert tuple(sides) == LADDER  # 11 sides: at most 121 bucket shapes up to 4096 x 4096


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6000), st.integers(1, 6000))
def test_bucket_holds_the_image_with_bounded_padding(h, w):
    hb, wb = buckets.bucket_shape(h, w)
    assert hb >= h and wb >= w
    for n, side in ((h, hb), (w, wb)):
        assert side == max(n, 128) or side < 1.5 * n  # at most 1.5x per side (2.25x in area)
        assert buckets.bucket_side(side) == side  # a bucket is its own bucket


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 512))
def test_bucket_multiple_rounds_up(n, multiple):
    side = buckets.bucket_side(n, multiple)
    assert side % multiple == 0 and n <= side < n + multiple


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.sampled_from([1, 2, 3, 8, 32]))
def test_batch_sizes_cover_without_padding(n, batch_size):
    sizes = buckets.batch_sizes(n, batch_size)
    assert sum(sizes) == n and all(s <= batch_size for s in sizes)
    assert all(s == batch_size or s & (s - 1) == 0 for s in sizes)  # full batches, then powers of two
    assert len({s for s in sizes if s != batch_size}) <= max(batch_size, 1).bit_length()


def test_plan_groups_images_by_bucket():
    sizes = [(480, 640), (100, 100), None, (500, 600), (8, 8), (470, 700), (1000, 20)]
    plan = buckets.plan(sizes, CascadeConfig(), batch_size=2)
    # (8, 8) has no pyramid level; (1000, 20) has one (20 px at scale 0.6 is one 12-pixel window)
    assert plan == [((512, 768), [0, 3]), ((512, 768), [5]), ((128, 128), [1]), ((1024, 128), [6])]


def _shapes_to_compile(groups: dict, batch_size: int, ready) -> int:
    return sum(not ready(b, n) for b, indices in groups.items() for n in set(buckets.batch_sizes(len(indices), batch_size)))


def test_merges_spare_compiles_within_the_padding_budget():
    cfg, none_ready = CascadeConfig(), lambda bucket, batch: False
    # the 7 reference photos' sizes: 5 ladder buckets
    sizes = [(2048, 1665), (561, 561), (1612, 1125), (630, 1200), (148, 199), (2048, 1638), (1991, 2048)]
    merged = buckets.merged_buckets(sizes, cfg, 1, none_ready)
    # 192x256 -> 768x768 (+540,672 pixels), then 768x768 (2 images) -> 768x1536 (+589,824 each),
    # 2048x1536 -> 2048x2048 (+1,048,576); 768x1536 (3 images) -> 2048x2048 would add 9,043,968
    assert merged == {(192, 256): (768, 1536), (768, 768): (768, 1536), (2048, 1536): (2048, 2048)}
    assert buckets.plan(sizes, cfg, 1, merged) == [((2048, 2048), [0]), ((2048, 2048), [2]), ((2048, 2048), [5]),
                                                    ((2048, 2048), [6]), ((768, 1536), [1]), ((768, 1536), [3]),
                                                    ((768, 1536), [4])]
    assert buckets.merged_buckets(sizes, cfg, 1, none_ready, budget=2**19) == {}  # every merge pads more
    # a bucket already compiled (or stored) runs as it is; so does one only a compile of the target would replace
    assert (192, 256) not in buckets.merged_buckets(sizes, cfg, 1, lambda bucket, batch: bucket == (192, 256))
    assert buckets.merged_buckets([(100, 100), (500, 700)], cfg, 1, lambda bucket, batch: False) == {
        (128, 128): (512, 768)}
    assert buckets.merged_buckets([(100, 100), (500, 700), (500, 700)], cfg, 2, none_ready) == {}  # a new batch of 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3000), st.integers(1, 3000)), max_size=12), st.sampled_from([1, 2, 8]),
       st.sets(st.sampled_from(LADDER), max_size=4), st.sampled_from([2**18, buckets.MERGE_PIXELS, 2**24]))
def test_merges_hold_their_images_and_never_add_compiles(sizes, batch_size, ready_sides, budget):
    cfg = CascadeConfig()
    ready = lambda bucket, batch: bucket[0] in ready_sides and batch == 1  # noqa: E731
    merged = buckets.merged_buckets(sizes, cfg, batch_size, ready, budget)
    ladder = buckets.plan(sizes, cfg, batch_size)
    batches = buckets.plan(sizes, cfg, batch_size, merged)
    assert sorted(i for _, chunk in batches for i in chunk) == sorted(i for _, chunk in ladder for i in chunk)
    own = {i: bucket for bucket, chunk in ladder for i in chunk}
    for bucket, chunk in batches:
        for i in chunk:
            assert sizes[i][0] <= bucket[0] and sizes[i][1] <= bucket[1]
            assert bucket == merged.get(own[i], own[i]) and bucket in own.values()  # a bucket of the plan
    assert set(merged) & set(merged.values()) == set()  # merges are resolved: no chains
    groups = lambda plan: {b: [i for bb, c in plan for i in c if bb == b] for b, _ in plan}  # noqa: E731
    before, after = _shapes_to_compile(groups(ladder), batch_size, ready), _shapes_to_compile(groups(batches), batch_size, ready)
    assert after <= before - len(merged)  # each merge spares a compile
    area = lambda b: b[0] * b[1]  # noqa: E731
    assert sum(area(merged.get(b, b)) - area(b) for b in own.values()) <= budget * len(merged)


def test_header_size_follows_exif_orientation(tmp_path):
    from PIL import Image

    exif = Image.Exif()
    exif[buckets.EXIF_ORIENTATION] = 6
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "r.jpg", exif=exif)
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "bad.jpg").write_text("not an image")
    assert buckets.header_hw(tmp_path / "r.jpg") == (50, 30)
    assert buckets.header_hw(tmp_path / "p.png") == (30, 50)
    assert buckets.header_hw(tmp_path / "bad.jpg") is None


# ---- stage programs shared by buckets ---------------------------------------------------------------

def test_shared_slots_are_powers_of_two():
    assert [cascade.shared_slots(n) for n in (1, 2, 3, 384, 512, 513, 1536, 4096)] == [1, 2, 4, 512, 512, 1024,
                                                                                        2048, 4096]


@pytest.fixture
def empty_compile_cache(tmp_path):
    """An empty compile cache folder for one test (executables stored by earlier runs would load without
    a compile), the session's folder back afterwards."""
    previous = compile_cache.folder()
    yield compile_cache.configure(tmp_path / "compiled")
    compile_cache.configure(previous)


def test_stage_programs_equal_the_whole_cascade_and_buckets_share_them(original_weights, shared_data, compiles,
                                                                       empty_compile_cache):
    """The compiled stages in a row give exactly what `cascade_fn` jitted as one program gives; a second
    bucket of the same slots and table slot compiles only its own two programs (pyramid and P-Net, crop
    sources): the P-Net NMS, both crops, R-Net and O-Net programs serve both."""
    config = CascadeConfig(min_face_size=16)  # a config no other test compiles
    photo = Image.open(shared_data / "reference" / "multiface.jpg").convert("RGB")
    image = np.asarray(photo.resize((170, round(170 * photo.height / photo.width))))
    first = compiles.count
    compiled.detect_bucket(original_weights, *buckets.pad_to_bucket([image[:80, :150]], (128, 192)), config)
    second = compiles.count
    assert cascade.table_slot((128, 192)) == cascade.table_slot((96, 256)) == (128, 256)
    images, sizes = buckets.pad_to_bucket([image], (96, 256))
    out = compiled.detect_bucket(original_weights, images, sizes, config)
    assert second - first == len(compiled.stage_chain((128, 192), config, "onet")) == 7
    assert compiles.count - second == 2
    level_hw, level_on, taps = image_plan(sizes, (96, 256), config)
    whole = jax.jit(cascade.cascade_fn, static_argnames="config")(
        original_weights, images, sizes, level_hw, level_on, taps, *PyramidPlan.of(96, 256, config).cells,
        config=config)
    assert out["valid"].sum() >= 2 and out["overflow"].keys() == whole["overflow"].keys()
    for got, want in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(whole)):
        np.testing.assert_array_equal(got, np.asarray(want))


# ---- compile once per machine --------------------------------------------------------------------

PROCESS = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    counts = {"compiles": 0, "hits": 0, "misses": 0}
    def on_duration(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            counts["compiles"] += 1
    def on_event(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            counts["hits"] += 1
        if event == "/jax/compilation_cache/cache_misses":
            counts["misses"] += 1
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    from mtcnn_jax import buckets, compiled, nets
    rng = np.random.default_rng(0)  # random params without compiling an initialiser
    shapes = jax.eval_shape(lambda: nets.init_params(jax.random.key(0)))
    params = jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    image = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
    counts.update(compiles=0, hits=0, misses=0)  # from the detection on
    # P-Net's part of the cascade (with its NMS): the same machinery as the whole, at half the compile
    out = compiled.detect_bucket(params, *buckets.pad_to_bucket([image], (128, 128)), upto="pnet")
    print(json.dumps({**counts, "scores": np.asarray(out["scores"]).tolist()}))
""")


def _run_process(cache: Path) -> dict:
    env = {**os.environ, compile_cache.ENV: str(cache)}
    done = subprocess.run([sys.executable, "-c", PROCESS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_compiles_nothing(tmp_path):
    first, second = _run_process(tmp_path), _run_process(tmp_path)
    assert first["compiles"] >= 1 and first["misses"] >= 1
    # The bucket's executable comes from disk: no XLA compile, not even a lookup in JAX's cache.
    assert second["compiles"] == second["hits"] == second["misses"] == 0
    assert second["scores"] == first["scores"]
    assert list((tmp_path / "executables").rglob("*.xla"))
    assert list((tmp_path / "exports").rglob("*.jaxexport"))  # the traced cascade is kept too


def test_an_executable_read_from_jaxs_cache_is_not_stored_again(tmp_path):
    """An XLA:CPU executable that JAX read from its persistent cache serializes without its kernels
    ("Function ..._kernel not found" when run): the store keeps only executables compiled here."""
    first = _run_process(tmp_path)
    shutil.rmtree(tmp_path / "executables")  # as after a change of code: JAX's cache still holds the bucket
    second = _run_process(tmp_path)
    assert second["hits"] >= 1 and second["misses"] == 0 and not list((tmp_path / "executables").rglob("*.xla"))
    assert _run_process(tmp_path)["scores"] == second["scores"] == first["scores"]


def test_cache_can_be_disabled_and_moved(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.default_folder() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "elsewhere"))
    assert compile_cache.default_folder() == tmp_path / "elsewhere"
    monkeypatch.delenv(compile_cache.ENV)
    assert compile_cache.default_folder().name == "compiled"


def test_a_damaged_export_is_rebuilt(tmp_path, monkeypatch):
    before = compile_cache._state.copy()
    try:
        compile_cache.configure(tmp_path)
        build = lambda: jax.export.export(jax.jit(lambda x: x * 2))(jax.ShapeDtypeStruct((3,), np.float32))  # noqa: E731
        exp, from_disk = compile_cache.exported("double", build)
        assert not from_disk
        assert compile_cache.exported("double", build)[1]
        [path] = (tmp_path / "exports").rglob("*.jaxexport")
        path.write_bytes(path.read_bytes()[:20])
        exp, from_disk = compile_cache.exported("double", build)
        assert not from_disk and np.asarray(exp.call(np.ones(3, np.float32))).tolist() == [2, 2, 2]
    finally:
        compile_cache.configure(before.get("folder", "default"))


def test_a_damaged_executable_is_rebuilt(tmp_path):
    before = compile_cache._state.copy()
    try:
        compile_cache.configure(tmp_path)
        arg = jax.ShapeDtypeStruct((3,), np.float32)
        build = lambda: jax.jit(lambda x: x * 3).lower(arg).compile()  # noqa: E731
        assert not compile_cache.executable("triple", build)[1]
        run, from_disk = compile_cache.executable("triple", build)
        assert from_disk and np.asarray(run(np.ones(3, np.float32))).tolist() == [3, 3, 3]
        [path] = (tmp_path / "executables").rglob("*.xla")
        path.write_bytes(path.read_bytes()[:100])
        run, from_disk = compile_cache.executable("triple", build)
        assert not from_disk and np.asarray(run(np.ones(3, np.float32))).tolist() == [3, 3, 3]
    finally:
        compile_cache.configure(before.get("folder", "default"))


# ---- compile ahead -------------------------------------------------------------------------------

def test_compile_ahead_leaves_nothing_to_compile(compiles):
    params = nets.init_params(jax.random.key(1))
    config = CascadeConfig(thresholds=(0.5, 0.5, 0.5), min_face_size=40)  # a config no other test compiles
    seen = []
    shapes = [((128, 192), 1), ((128, 192), 1)]
    with compiled.CompileAhead(params, shapes, config, upto="pnet", on_change=seen.append) as ahead:
        pass
    assert ahead.pending == 0 and seen[0] == 1 and seen[-1] == 0  # the duplicate shape compiles once
    before = compiles.count
    image = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    compiled.detect_bucket(params, *buckets.pad_to_bucket([image], (128, 192)), config, upto="pnet")
    assert compiles.count == before


# ---- ready for accelerators ----------------------------------------------------------------------

# bytes; the largest legitimate buffer is O-Net's crops of the batch at its capacity, which the O-Net program
# shared by all buckets reads (64 x 512 x 48 x 48 x 3 floats, 864 MiB), then the summed-area tables and P-Net maps
BUFFER_BOUND = 2**30
_BYTES = {"f32": 4, "i32": 4, "ui32": 4, "f16": 2, "bf16": 2, "i16": 2, "i8": 1, "ui8": 1, "i1": 1,
          "i64": 8, "f64": 8}


def test_cuda_lowering_stays_within_a_memory_bound():
    """The whole cascade for a batch of 64 640x480 images, lowered for CUDA without a GPU: no tensor
    over BUFFER_BOUND (an NMS holding a K x K mask over the P-Net window capacity would need
    64 x 3072 x 3072 floats, 2.3 GiB), and no CPU-only convolution forms."""
    params = jax.eval_shape(lambda: nets.init_params(jax.random.key(0)))
    config = CascadeConfig()
    bucket = buckets.bucket_shape(480, 640, config)
    exp = compiled.export_cascade(params, bucket, 64, config, platforms=["cuda"])
    assert exp.platforms == ("cuda",)
    text = exp.mlir_module()
    types = set(re.findall(r"tensor<([0-9x]+)x([a-z]+[0-9]+)>", text))
    assert types
    biggest = max(int(np.prod([int(d) for d in dims.split("x")])) * _BYTES[dtype] for dims, dtype in types)
    assert biggest <= BUFFER_BOUND, f"largest buffer {biggest / 2**20:.0f} MiB"
    window_capacity, pnet_capacity = buckets.bucket_capacities(config, *bucket)
    for k in {window_capacity, pnet_capacity, config.rnet_capacity, config.max_faces}:
        assert not any(re.search(rf"(^|x){k}x{k}(x|$)", dims) for dims, _ in types), k
    # The CPU forms are chosen by backend: on CUDA, P-Net's conv3 is one convolution (CPU: two of 16 output
    # channels) and the first layers of R-Net and O-Net are convolutions (CPU: im2col matrix products).
    kernels = lambda mlir: re.findall(r"stablehlo.convolution.*tensor<([0-9x]+)xf32>\) ->", mlir)  # noqa: E731
    cpu = kernels(compiled.export_cascade(params, bucket, 1, config, platforms=["cpu"]).mlir_module())
    cuda = kernels(text)
    assert "3x3x16x16" in cpu and "3x3x16x16" not in cuda and "3x3x16x32" in cuda
    assert "3x3x3x28" not in cpu and "3x3x3x32" not in cpu and {"3x3x3x28", "3x3x3x32"} <= set(cuda)
