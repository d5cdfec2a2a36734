#!/usr/bin/env bash
# The GPU check of the 8-GPU-node issue, one short run (about 5 minutes) for a lent GPU machine:
#   1. nvidia-smi: the GPU's name, memory and driver;
#   2. bench/dip_overhead.py --device cuda: DIP's step time and memory against sft, bf16, a ~125M
#      Llama at sequence 512 (m = 1, 2, 4), interleaved rounds;
#   3. bench/gpu_smoke.py: a ~125M random Llama through the real pipeline on one GPU: DIP
#      conversion, a DeepSpeed ZeRO-2 bf16 run of pipeline/train.py, bf16 export with the logit
#      check; step time, tokens/s, peak GPU memory.
#
# A GPU machine reaches no package registry and lacks deepspeed, pydantic and dipnet itself.
# Here, once, fetch and build those wheels into .whl/ (ignored by git; under 10 MB):
#     bash bench/gpu_smoke.sh --prepare
# then, through the device tool:
#     run(command="bash bench/gpu_smoke.sh", carry=[".whl"], timeout_s=540)
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

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DIPNET_CACHE=/tmp/dipnet-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
echo "== DIP overhead (bf16, ~125M Llama, seq 512)"
timeout 200 python3 bench/dip_overhead.py --device cuda --rounds 3 || echo "dip_overhead failed or timed out ($?)"
echo "== 1-GPU DeepSpeed ZeRO-2 bf16 run with DIP, then export"
timeout 240 python3 bench/gpu_smoke.py --out /tmp/smoke || { echo "gpu_smoke failed ($?)"; tail -40 /tmp/smoke/train/train.log; }
