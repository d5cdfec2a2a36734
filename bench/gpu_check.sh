#!/usr/bin/env bash
# The GPU check of the 8-GPU-node issue: one command, about 5 minutes, one JSON (bench/gpu_check.py
# says what each step measures: versions and SDPA kernels; SmolLM2-shape LoRA + DIP under ZeRO-2
# with a resume and a verified export; Gemma-3-270M-shape full fine-tune + DIP under ZeRO-3 and
# export; two Qwen2.5-7B-width blocks with and without DIP and gradient checkpointing;
# bench/dip_overhead.py on the GPU).
#
# A GPU machine may reach no package registry and lack deepspeed, pydantic and dipnet itself.
# Here, once, fetch and build those wheels into .whl/ (ignored by git; under 10 MB):
#     bash bench/gpu_check.sh --prepare
# then, through the device tool:
#     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=480)
# and on any machine, at toy sizes on the CPU with this checkout's venv (make test runs it):
#     bash bench/gpu_check.sh --cpu [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  py=.venv/bin/python
  rm -rf .whl && mkdir -p .whl
  pv() { $py -c "import importlib.metadata as m; print(m.version('$1'))"; }
  # Binary wheels for the GPU image's Python 3.12 (x86-64), at the versions this checkout runs.
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "pydantic==$(pv pydantic)" "pydantic-core==$(pv pydantic_core)" "annotated-types==$(pv annotated_types)" \
    "typing-inspection==$(pv typing_inspection)" "hjson==$(pv hjson)" 2>&1 | grep -v "^WARNING: Location" || true
  # deepspeed ships only a source distribution: build its pure-Python wheel (no ops compiled).
  DS_BUILD_OPS=0 $py -m pip wheel -q --no-deps -w .whl "deepspeed==$(pv deepspeed)" 2>&1 | grep -v "^WARNING: Location" || true
  $py -m pip wheel -q --no-deps --no-build-isolation -w .whl . 2>&1 | grep -v "^WARNING: Location" || true
  ls -la .whl
  du -sh .whl
  exit 0
fi

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ "${1:-}" = "--cpu" ]; then
  if [ "${2:-}" = "--out" ] && [ -n "${3:-}" ]; then out=$3; else out=$(mktemp -d -t dipnet-gpu-check-XXXXXX); fi
  exec "${PYTHON:-.venv/bin/python}" bench/gpu_check.py --cpu --out "$out"
fi

export DIPNET_CACHE=/tmp/dipnet-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
timeout 420 python3 bench/gpu_check.py --out /tmp/gpu-check || {
  rc=$?; echo "gpu_check exited $rc"; tail -30 /tmp/gpu-check/*-run/train.log 2>/dev/null || true; exit $rc; }
