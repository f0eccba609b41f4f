# One command runs every gate, the same locally and in CI: `make check`.
PYTHON ?= python3
PREFIX ?= /usr/local
VENV := .venv
MLX_VENV := .venv-mlx
MLX18_VENV := .venv-mlx18
LITELLM_VENV := .venv-litellm
PY := $(VENV)/bin/python
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: all check deps lint types test test-fast bench demo soak install uninstall venvs readme clean

all: check

# Debian packages the real-component tests need (program=package): the test sshd, its client and
# keys, rsync, a Prometheus to scrape `metrics`, and systemd-analyze to verify the service unit. `deps` installs the missing ones when it can
# (root with apt-get), else stops with one line naming them. test-fast needs none of them.
DEB_NEEDS := /usr/sbin/sshd=openssh-server ssh=openssh-client ssh-keygen=openssh-client rsync=rsync \
	/usr/bin/prometheus=prometheus systemd-analyze=systemd
missing_debs = $(strip $(shell for n in $(DEB_NEEDS); do \
	command -v "$${n%%=*}" >/dev/null 2>&1 || echo "$${n#*=}"; done | sort -u))
can_apt = $(shell [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && echo yes)

deps:
	@$(if $(missing_debs),$(if $(can_apt),,$(error missing Debian packages; as root run: \
		apt-get install -y $(missing_debs))))true
	@set -e; missing="$(missing_debs)"; if [ -n "$$missing" ]; then \
		echo "deps: apt-get install -y $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq; apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

$(VENV)/.ok: Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_QUIET) pytest pytest-cov pytest-timeout hypothesis "coverage>=7.10" \
		ruff "mypy<2" PyYAML types-PyYAML huggingface_hub prometheus_client
	touch $@

# The real model server, CPU build (COMPONENTS.md): 1.6.3 is the newest that runs on Linux.
$(MLX_VENV)/.ok:
	$(PYTHON) -m venv $(MLX_VENV)
	$(MLX_VENV)/bin/pip install $(PIP_QUIET) "mlx[cpu]" mlx-lm "mlx-openai-server==1.6.3" torch==2.13.0
	$(MLX_VENV)/bin/pip uninstall -y $(PIP_QUIET) torchvision
	touch $@

# The newest release, 1.8.1, also runs on Linux CPU without mflux (COMPONENTS.md): the script reads
# the wheel's Requires-Dist, drops mflux and torchvision, asks for mlx[cpu] and adds torch==2.13.0.
$(MLX18_VENV)/.ok: tests/install_mlx_server.py
	rm -rf $(MLX18_VENV)
	$(PYTHON) tests/install_mlx_server.py $(MLX18_VENV) 1.8.1
	touch $@

# The real gateway, pinned (never an unpinned litellm).
$(LITELLM_VENV)/.ok:
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install $(PIP_QUIET) "litellm[proxy]==1.106.0"
	touch $@

venvs: $(VENV)/.ok $(MLX_VENV)/.ok $(MLX18_VENV)/.ok $(LITELLM_VENV)/.ok

lint: $(VENV)/.ok
	$(VENV)/bin/ruff check mlxctl tests
	$(VENV)/bin/ruff format --check mlxctl tests

types: $(VENV)/.ok
	$(VENV)/bin/mypy --strict mlxctl.py
	$(VENV)/bin/mypy --strict --python-version 3.9 mlxctl.py

# Every test, real components included; line coverage of mlxctl (subprocesses too) >= 90 %.
test: deps venvs
	MLXCTL_TESTS_STRICT=1 $(PY) -m pytest --cov --cov-config=pyproject.toml --cov-report=term-missing:skip-covered --cov-fail-under=90 tests

test-fast: $(VENV)/.ok
	$(PY) -m pytest -m "not real" tests

check: lint types readme test

readme: $(VENV)/.ok
	$(PY) tests/gen_readme.py --check

bench: deps venvs
	$(PY) tests/bench/run.py

soak: deps venvs
	MLXCTL_SOAK=1 $(PY) -m pytest -s tests/test_faults.py tests/test_stress.py tests/test_fuzz.py \
		tests/test_watch.py::test_supervision_under_random_kills

demo: deps venvs
	$(PY) tests/demo.py

install:
	mkdir -p $(DESTDIR)$(PREFIX)/bin
	ln -sf $(abspath mlxctl) $(DESTDIR)$(PREFIX)/bin/mlxctl

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/mlxctl

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov build dist *.egg-info
