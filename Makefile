# One command runs every gate, the same locally and in CI: `make check`.
PYTHON ?= python3
PREFIX ?= /usr/local
VENV := .venv
MLX_VENV := .venv-mlx
LITELLM_VENV := .venv-litellm
PY := $(VENV)/bin/python
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: all check lint types test test-fast bench demo soak install uninstall venvs readme clean

all: check

$(VENV)/.ok: Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) pytest pytest-cov pytest-timeout hypothesis "coverage>=7.10" \
		ruff "mypy<2" PyYAML types-PyYAML huggingface_hub
	touch $@

# The real model server, CPU build (COMPONENTS.md): 1.6.3 is the newest that runs on Linux.
$(MLX_VENV)/.ok:
	$(PYTHON) -m venv $(MLX_VENV)
	$(MLX_VENV)/bin/pip install $(PIP_QUIET) "mlx[cpu]" mlx-lm "mlx-openai-server==1.6.3" torch==2.13.0
	$(MLX_VENV)/bin/pip uninstall -y $(PIP_QUIET) torchvision
	touch $@

# The real gateway, pinned (never an unpinned litellm).
$(LITELLM_VENV)/.ok:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install $(PIP_QUIET) "litellm[proxy]==1.106.0"
	touch $@

venvs: $(VENV)/.ok $(MLX_VENV)/.ok $(LITELLM_VENV)/.ok

lint: $(VENV)/.ok
	$(VENV)/bin/ruff check mlxctl tests
	$(VENV)/bin/ruff format --check mlxctl tests

types: $(VENV)/.ok
	$(VENV)/bin/mypy --strict mlxctl.py
	$(VENV)/bin/mypy --strict --python-version 3.9 mlxctl.py

# Every test, real components included; line coverage of mlxctl (subprocesses too) >= 90 %.
test: venvs
	$(PY) -m pytest --cov --cov-config=pyproject.toml --cov-report=term-missing:skip-covered --cov-fail-under=90 tests

test-fast: $(VENV)/.ok
	$(PY) -m pytest -m "not real" tests

check: lint types readme test

readme: $(VENV)/.ok
	$(PY) tests/gen_readme.py --check

bench: venvs
	$(PY) tests/bench/run.py

soak: venvs
	MLXCTL_SOAK=1 $(PY) -m pytest -s tests/test_faults.py tests/test_stress.py tests/test_fuzz.py

demo: venvs
	$(PY) tests/demo.py

install:
	mkdir -p $(DESTDIR)$(PREFIX)/bin
	ln -sf $(abspath mlxctl) $(DESTDIR)$(PREFIX)/bin/mlxctl

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/mlxctl

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov build dist *.egg-info
