#!/usr/bin/env bash
# Prepares .device/ (ignored by git) for benchmarks/device_run.sh: here, on the CPU machine, before a
# session that is lent a GPU machine (the `device` tool: nothing can be fetched there, and only the
# repository travels). Holds the wheels the GPU machine's image lacks (TFDS and its missing needs, lz4 for
# the original weights, PyAV, facenet-pytorch), the mtcnn wheel with the original weights, the shared
# reference photos, a 720p clip made from them, and our CPU detections of the photos to compare with.
#
#     bash benchmarks/device_prepare.sh      # ~1 min; then, with the device tool:
#     run(command="bash benchmarks/device_run.sh", carry=[".device"], timeout_s=590)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${MTCNN_JAX_DATA:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.device/' .git/info/exclude || echo '/.device/' >> .git/info/exclude
rm -rf .device && mkdir -p .device/whl .device/reference
# The image's Python is 3.12 (device README, KINDS.md); one version of each package.
for package in tensorflow-datasets==4.9.10 array_record==0.8.6 dm-tree immutabledict simple_parsing \
    docstring_parser tensorflow-metadata googleapis-common-protos termcolor toml importlib_resources lz4 av facenet-pytorch==2.6.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .device/whl "$package"
done
python3 -m pip wheel -q --no-deps -w .device/whl promise==2.3  # TFDS needs it; PyPI has no wheel of it
cp "$("$PY" -c 'from mtcnn_jax import pretrained; print(pretrained.locate())')" .device/whl/
cp "$DATA"/reference/*.jpg .device/reference/
"$PY" benchmarks/make_clip.py .device/clip720.mp4 --size 720x1280 --frames-per-photo 60 --photos 2
"$PY" -m mtcnn_jax.detect .device/reference --json .device/cpu_reference.json --overwrite
du -sh .device  # the working tree and .device travel together: 64 MiB at most
