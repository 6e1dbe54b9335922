#!/usr/bin/env bash
# Wheels for the GPU machine, built / downloaded here into ./wheels (git-ignored) and carried there.
#
# That machine (Python 3.12, torch 2.11, no registry access) lacks deepspeed, mosaicml-streaming, webdataset,
# diffusers, hjson, pydantic and the compressors streaming imports at load time. Everything it already has
# (numpy, torch, tqdm, msgpack, ninja, psutil, py-cpuinfo, einops, xxhash, safetensors, requests, httpx,
# pillow, pyyaml, regex, huggingface-hub 1.x, transformers 5.x, ...) is left alone.
#
#   wheels/*.whl            always installed (pip --no-deps --target /tmp/site, see bench/run_gpu.sh)
#   wheels/fallback/*.whl   installed only if `import streaming` fails with the image's transformers 5.x
#                           (streaming imports transformers' BatchFeature / BatchEncoding; it pins <5)
#
# Usage: bash bench/build_wheels.sh      (from the repo root; ~1 min; total kept under 60 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=wheels
rm -rf "$OUT"
mkdir -p "$OUT/fallback"

# deepspeed's registry release is an sdist: build a pure wheel (no ops compiled; FusedAdam JIT-builds there).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8

PLATFORM=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
get() {  # get DEST NAME==VERSION ...   (binary wheels for CPython 3.12 / x86-64 manylinux, no dependencies)
  local dest=$1; shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORM[@]}" -d "$dest" "$@"
}

# deepspeed's needs beyond the image; streaming's import-time needs; webdataset; diffusers (VAE in data_prep /
# sampling). Versions as constraints.txt pins them, except zstd (1.5.7.2 has no cp312 wheel; streaming only
# needs the module to import).
get "$OUT" hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 \
  mosaicml-streaming==0.13.0 catalogue==2.0.10 python-snappy==0.7.3 cramjam==2.14.0 zstd==1.5.6.1 brotli==1.2.1 \
  webdataset==1.0.2 braceexpand==0.1.7 \
  diffusers==0.38.0 importlib-metadata==10.2.0
get "$OUT/fallback" transformers==4.57.6 huggingface-hub==0.36.2 tokenizers==0.22.2

du -ch "$OUT"/*.whl "$OUT"/fallback/*.whl | tail -1
total=$(du -cb "$OUT"/*.whl "$OUT"/fallback/*.whl | tail -1 | cut -f1)
if (( total > 60 * 1024 * 1024 )); then
  echo "wheels total $total bytes > 60 MiB: the device carry limit is 64 MiB for everything" >&2
  exit 1
fi
ls -1 "$OUT" "$OUT/fallback"
