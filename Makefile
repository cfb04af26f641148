# `make demo`: set up .venv and run the whole embedded study on the synthetic world.
# `make test`: set up .venv, lint (ruff, snakemake --lint) and run the test suite; CI runs it (.ci/run).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CORES ?= 2
SNAKEMAKE := $(VENV)/bin/snakemake

.PHONY: install demo test test-quick lint dryrun bench bench-dag bench-startup learning clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,inspect]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SNAKEMAKE) --cores $(CORES) --profile workflow/profiles/default
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SNAKEMAKE) --cores $(CORES) --profile workflow/profiles/default --report results/report.html

# A lint finding fails the tests: ruff, then snakemake's own linter (rules vs functions, paths, ...).
test: $(STAMP) lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pytest -q --durations=15

# While developing: everything but the end-to-end runs (marker slow: the scale model's whole DAG, kill/resume
# and DDP runs, the GPU benchmark's smoke run) and the local SLURM (marker slurm). CI runs all (`make test`).
test-quick: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pytest -q -m "not slow and not slurm"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SNAKEMAKE) --lint

dryrun: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SNAKEMAKE) -n --cores $(CORES)

bench: $(STAMP) bench-dag bench-startup
	$(PY) benchmarks/shards.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/scale_step.py
	$(PY) benchmarks/demo_pretrain.py

# Planning CPU of `snakemake -n` at ~250 / 500 / 1,000 jobs, with and without the composition cache (~1 min)
bench-dag: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/dag.py

# Start-up CPU of every job entry point (--help; imports up to the first work) vs `import torch` (~3 min)
bench-startup: $(STAMP)
	$(PY) benchmarks/startup.py

# Does the trainer learn? MoCo-v2 (scale model, 1224 steps) vs random init on syn_cls, paper protocol (~5 min)
learning: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" OMP_NUM_THREADS=1 $(PY) benchmarks/learning.py

clean:
	rm -rf results .snakemake
