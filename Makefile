# `make demo`: set up .venv and run the whole embedded study on the synthetic world.
# `make test`: set up .venv and run the test suite.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CORES ?= 2
SNAKEMAKE := $(VENV)/bin/snakemake

.PHONY: install demo test lint dryrun bench learning clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,inspect]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SNAKEMAKE) --cores $(CORES) --profile workflow/profiles/default
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SNAKEMAKE) --cores $(CORES) --profile workflow/profiles/default --report results/report.html

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SNAKEMAKE) --lint

dryrun: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(SNAKEMAKE) -n --cores $(CORES)

bench: $(STAMP)
	$(PY) benchmarks/shards.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/train_step.py

# Does the trainer learn? MoCo-v2 (scale model, 1224 steps) vs random init on syn_cls, paper protocol (~5 min)
learning: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" OMP_NUM_THREADS=1 $(PY) benchmarks/learning.py

clean:
	rm -rf results .snakemake
