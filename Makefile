# argse — the two set-up commands are `make demo` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGSE := $(VENV)/bin/argse
DATA ?= data
STORE ?= artifacts
SHARED ?= ../shared
DOWNLOAD ?= 0
export ARGSE_DATA := $(DATA)
export ARGSE_STORE := $(STORE)

.PHONY: install install-dev data demo test test-all lint schemas digests bench reproduce results-c100lt results-c10lt clean gpu-carry gpu-wheels gpu-check-dry

# install: the package alone (all `make demo` needs); install-dev: also the test, cluster and results
# extras (pytest, ruff, submitit, pandas/pyarrow) for `make test`, `make lint` and `argse sweep --executor slurm`
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(VENV)/bin/pip install -q -c constraints.txt -e .
	touch $@

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test,cluster,results]'
	touch $@

# CIFAR-10: the offline copy from ../shared when present; else download only when asked.
data: install $(DATA)/cifar-10-batches-py/batches.meta

$(DATA)/cifar-10-batches-py/batches.meta:
	@if [ -f $(SHARED)/data/cifar10/build_cifar10.py ]; then \
	  $(PY) $(SHARED)/data/cifar10/build_cifar10.py $(DATA); \
	elif [ "$(DOWNLOAD)" = "1" ]; then \
	  $(MAKE) install && $(ARGSE) split --download --data-root $(DATA) --print-key >/dev/null; \
	else \
	  echo "CIFAR-10 not found under $(DATA)/: run 'make demo DOWNLOAD=1' (torchvision download) or put cifar-10-batches-py/ there"; exit 2; \
	fi

DEMO_CFG ?= configs/demo.yaml
DEMO := --config $(DEMO_CFG)
DEMO_OUT ?= reports/demo
DEMO_IMPORT ?= build/demo_import
demo: install data
	ARGSE=$(ARGSE) PY=$(PY) CFG=$(DEMO_CFG) OUT=$(DEMO_OUT) IMPORT=$(DEMO_IMPORT) bash scripts/demo.sh

test: install-dev
	env -u ARGSE_DATA -u ARGSE_STORE $(PY) -m pytest -q

test-all: install-dev
	$(PY) -m pytest -q -m "not gpu"

lint: install-dev
	$(VENV)/bin/ruff check argse_cli tests bench scripts

schemas: install
	$(PY) -m argse_cli.schemas --write

digests: install
	$(PY) -m argse_cli.digests --update

bench: install data
	$(PY) bench/run_all.py

# The GPU check (bench/gpu_check.sh): fill the git-ignored .carry/ that the device tool's `run` takes
# along (carry=[".carry"]): the cp312 manylinux wheels the GPU machine lacks, pinned to this venv's
# versions (bench/gpu_wheels.py; checked with pip's dry run), the offline CIFAR-10 builder and
# archive, and the commit the code came from; fails when the tree + .carry exceed 64 MiB.
gpu-carry gpu-wheels: install
	$(PY) bench/gpu_wheels.py download --dest .carry/wheels
	@f=$(SHARED)/data/cifar10/build_cifar10.py; test -f $$f || { \
	  echo "error: SHARED: no $$f -- fix: make gpu-carry SHARED=/path/to/shared"; exit 2; }
	mkdir -p .carry/shared/data/cifar10
	install -m 0644 $(SHARED)/data/cifar10/build_cifar10.py $(SHARED)/data/cifar10/cifar10_offline.npz.xz \
	  .carry/shared/data/cifar10/
	$(PY) bench/gpu_wheels.py check --pip --wheels .carry/wheels
	$(PY) bench/gpu_check.py --record-carry

gpu-check-dry: install
	PY=$(PY) bash bench/gpu_check.sh --dry-run

REPRO := --config configs/cifar10lt.yaml
reproduce: install data
	$(ARGSE) split $(REPRO)
	$(ARGSE) train-expert $(REPRO)
	$(ARGSE) export-logits $(REPRO)
	$(ARGSE) calibrate $(REPRO)
	for s in 42 43 44 45 46; do \
	  $(ARGSE) train-gate $(REPRO) --beta balanced --seed $$s && \
	  $(ARGSE) train-gate $(REPRO) --beta worst --xi 1.0 --seed $$s && \
	  $(ARGSE) eval $(REPRO) --gate $$($(ARGSE) train-gate $(REPRO) --beta balanced --seed $$s --print-key) && \
	  $(ARGSE) eval $(REPRO) --gate $$($(ARGSE) train-gate $(REPRO) --beta worst --xi 1.0 --seed $$s --print-key) || exit 1; \
	done
	$(ARGSE) baselines $(REPRO)
	$(ARGSE) report $(REPRO) --out reports/cifar10lt \
	  $$(for s in 42 43 44 45 46; do for b in "--beta balanced" "--beta worst --xi 1.0"; do \
	    echo --eval $$($(ARGSE) eval $(REPRO) --gate $$($(ARGSE) train-gate $(REPRO) $$b --seed $$s --print-key) --print-key); done; done) \
	  --baselines $$($(ARGSE) baselines $(REPRO) --print-key)

# CIFAR-100-LT on the published expert logits (../shared/data/cifar100lt-logits): cross-fitting
# (PROTOCOL=crossfit, 5 folds; PROTOCOL=holdout keeps the single clean split), 5 gate seeds x 2 gates.
PROTOCOL ?= crossfit
C100 := build/c100lt-$(PROTOCOL)
C100NPZ := $(SHARED)/data/cifar100lt-logits/cifar100lt_real_logits.npz
SEEDS := 42 43 44 45 46
$(C100)/protocol.json: argse_cli/data/c100lt.py
	@if [ ! -f $(C100NPZ) ]; then echo "$(C100NPZ) not found: the CIFAR-100-LT logits come from ../shared/data/cifar100lt-logits (set SHARED=...)"; exit 2; fi
	rm -rf $(C100) && $(PY) -m argse_cli.data.c100lt $(C100NPZ) $(C100) --protocol $(PROTOCOL) >/dev/null

results-c100lt: install $(C100)/protocol.json
	ARGSE=$(ARGSE) PY=$(PY) C100=$(C100) SEEDS="$(SEEDS)" bash scripts/results_c100lt.sh

# CIFAR-10-LT from experts trained here on the CPU (configs/cifar10lt-cpu.yaml; ~1-1.5 h on 2 cores).
results-c10lt: install data
	ARGSE=$(ARGSE) PY=$(PY) bash scripts/results_c10lt.sh

clean:
	rm -rf $(STORE) reports
