#!/usr/bin/env bash
# One GPU, at most 8 minutes: ViT-B/32 b256 samples/s and MFU for cliplab (eager, compiled, GPU JPEG decode)
# next to open_clip_train on the same 224-px shards. Needs only the README's install (.venv); open_clip_train's
# webdataset 0.2.86 goes to ~/.cache/cliplab-bench on first use. `--smoke`: the same sides on CPU, tiny sizes.
#   benchmarks/gpu.sh [--smoke] [--json PATH] [--workdir DIR] [--steps N] [--ray-address ADDR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu.py "$@"
