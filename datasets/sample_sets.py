"""The per-stage training sample sets (Zhang et al. 2016, Sec. III-A) as TFDS datasets, and reading them.

`MtcnnSamples` (configs pnet, rnet, onet) builds from a manual directory that `stage_samples` lays out:
pixels.npy, the crops (N, S, S, 3) uint8, and records.npz, their labels, targets and provenance. Records
are written shard by shard straight from those files (array_record, no TensorFlow), so writing holds a
shard's worth of records at most, never the whole set. `load_samples` reads a set back, randomly, parsing
the records itself a batch at a time (TFDS's per-record decode would slow a streamed trainer).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2  # tf.train.Example without TensorFlow

from mtcnn_jax.stages import INPUT_SIZE

FIELDS = ("label", "box", "landmarks", "crop", "flipped")  # the per-sample arrays besides image and source
SHARD_RECORDS = 50_000  # records per shard: what the shard writer holds (as memory-mapped views) at once


def stage_samples(manual_dir: str | Path, size: int, total: int, parts: Iterable[dict[str, Any]]) -> Path:
    """Lay out `total` samples of side `size` as MtcnnSamples' manual directory, one part at a time
    (the pixels go straight to a memory-mapped file). Each part holds one source image's samples:
    "keys" (unique names), "source" (the image's path), "table" {FIELDS: arrays}, "pixels" (n, S, S, 3)."""
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.lib.format.open_memmap(manual_dir / "pixels.npy", "w+", np.uint8, (total, size, size, 3))
    keys, sources, source_index, tables, start = [], [], [], [], 0
    for part in parts:
        n = len(part["keys"])
        pixels[start : start + n] = part["pixels"]
        keys += part["keys"]
        source_index.append(np.full(n, len(sources), np.int32))
        sources.append(part["source"])
        tables.append(part["table"])
        start += n
    if start != total:
        raise ValueError(f"expected {total} samples, got {start}")
    pixels.flush()
    del pixels
    np.savez(manual_dir / "records.npz", key=np.array(keys, str), source=np.array(sources, str),
             source_index=np.concatenate(source_index or [np.zeros(0, np.int32)]),
             **{f: np.concatenate([t[f] for t in tables]) for f in FIELDS})
    return manual_dir


def record_order(keys: Sequence[str], salt: str = "train") -> np.ndarray:
    """The order records are written in: by the MD5 of the split name and the key, the order TFDS's shuffling
    writer gave them before this builder wrote its shards itself (so the sets are the same). Images and
    sample types are mixed through the set: the trainer holds back evenly spaced indices."""
    salted = hashlib.md5(salt.encode())

    def hkey(key: str) -> int:
        md5 = salted.copy()
        md5.update(key.encode())
        return int(md5.hexdigest(), 16)

    return np.array(sorted(range(len(keys)), key=lambda i: hkey(keys[i])), np.int64)


class MtcnnSamples(tfds.core.ShardBasedBuilder):
    """MTCNN training samples of one stage, with provenance: the source image, the crop, the flip."""

    name = "mtcnn_samples"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=s, description=f"{n}x{n} crops") for s, n in INPUT_SIZE.items()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "`stage_samples` writes pixels.npy and records.npz here."

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        n, f = INPUT_SIZE[self.builder_config.name], tfds.features
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, disable_shuffling=True,
                                     features=f.FeaturesDict({
            "image": f.Tensor(shape=(n, n, 3), dtype=np.uint8), "label": f.Tensor(shape=(), dtype=np.int32),
            "box": f.Tensor(shape=(4,), dtype=np.float32), "landmarks": f.Tensor(shape=(10,), dtype=np.float32),
            "source": f.Text(), "crop": f.Tensor(shape=(4,), dtype=np.float32),
            "flipped": f.Tensor(shape=(), dtype=np.bool_)}))

    def _shard_iterators_per_split(self, dl_manager):
        records = dict(np.load(Path(dl_manager.manual_dir) / "records.npz"))
        pixels = np.load(Path(dl_manager.manual_dir) / "pixels.npy", mmap_mode="r")
        order = record_order(records["key"].tolist())
        shards = [order[a : a + SHARD_RECORDS] for a in range(0, len(order), SHARD_RECORDS)]
        return {"train": [lambda rows=rows: self._examples(records, pixels, rows) for rows in shards]}

    @staticmethod
    def _examples(records: dict, pixels: np.ndarray, rows: np.ndarray) -> Iterator[tuple[str, dict]]:
        for i in rows:
            source = str(records["source"][records["source_index"][i]])
            yield str(records["key"][i]), {"image": pixels[i], "source": source, **{f: records[f][i] for f in FIELDS}}


class Samples:
    """Random access to a written sample set: len(s), s[i] -> {"box", "crop", "flipped", "image", "label",
    "landmarks", "source"}: TFDS's decoded record, with python label/flipped and str source.

    The records are parsed here rather than by TFDS: its per-record, per-field Python decode (the image is
    an int64 list) costs several times the read and slowed the streamed trainer. The protobuf parser turns
    each record into lists, and numpy converts each field a batch at a time, to the same values."""

    def __init__(self, records: Any, image_shape: Sequence[int]):
        self.records = records  # serialized tf.train.Examples: len, [i], __getitems__
        self.image_shape = tuple(image_shape)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._decode([self.records[i]])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Many records in one read (much faster than one by one for array_record)."""
        return self._decode(self.records.__getitems__([int(i) for i in indices]))

    def _decode(self, records: Sequence[bytes]) -> list[dict[str, Any]]:
        """TFDS's decoded records (keys sorted, as it gives them), parsed a batch at a time."""
        if not records:
            return []
        rows = [tf_example_pb2.Example.FromString(r).features.feature for r in records]
        images = np.array([f["image"].int64_list.value for f in rows], np.uint8).reshape(-1, *self.image_shape)
        # float32s read back as python floats: exact (numpy takes short lists faster than protobuf's containers)
        box, crop, landmarks = (np.array([list(f[k].float_list.value) for f in rows], np.float32)
                                for k in ("box", "crop", "landmarks"))
        return [{"box": box[i], "crop": crop[i], "flipped": bool(f["flipped"].int64_list.value[0]), "image": images[i],
                 "label": int(f["label"].int64_list.value[0]), "landmarks": landmarks[i],
                 "source": f["source"].bytes_list.value[0].decode()} for i, f in enumerate(rows)]


def load_samples(directory: str | Path) -> Samples:
    """The sample set written under `directory` (by `mtcnn_jax.samples.make_samples` or its CLI): its records
    read through TFDS's data source, as raw bytes that `Samples` parses."""
    found = sorted(Path(directory).glob("**/dataset_info.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one sample set under {directory}, found {len(found)}")
    builder = tfds.builder_from_directory(str(found[0].parent))
    raw = builder.as_data_source(split="train", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    return Samples(raw, builder.info.features["image"].shape)
