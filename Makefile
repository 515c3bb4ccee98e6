# repro: every paper table and figure is a spec run by one runner. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build: on this project's CPU machines torch 2.14.1 / torchvision 0.29.1 come from local disk.
# On a GPU machine pass the build matching your CUDA, e.g. make install TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TIER ?= full
SEEDS ?=
NPROC ?= 1
# Runs at once. Empty: on a CPU independent runs side by side, one per core; on a GPU one. JOBS=1: one at a time.
JOBS ?=
EXECUTOR ?= local
REPRO = $(PY) -m repro
# One intra-op thread per process on CPU: on a shared 2-core machine two threads per process were measured up to
# ~10x slower (they wait on each other whenever anything else runs). GPU runs are unaffected. Override freely.
export OMP_NUM_THREADS ?= 1
RUN_ARGS = --tier $(TIER) $(if $(SEEDS),--seeds $(SEEDS),) $(if $(filter-out 1,$(NPROC)),--nproc $(NPROC),) \
	$(if $(JOBS),--jobs $(JOBS),) $(if $(filter-out local,$(EXECUTOR)),--executor $(EXECUTOR),)

# `make test`: every test not marked slow, on all cores (pytest-xdist; one test file per worker, so a file's
# module fixtures are built once); `make test-all` adds the slow end-to-end ones. TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= auto
PYTEST = HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: help install test test-all smoke figures bench teachers schema clean-smoke
help:
	@echo "make install                         create $(VENV) and install repro with its test extras"
	@echo "make test                            the fast tests, on all cores (installs first; TEST_WORKERS=n)"
	@echo "make test-all                        every test, the slow end-to-end ones too (what CI runs)"
	@echo "make table-wttm-cifar100 TIER=smoke  run + render tables/wttm-cifar100.md (TIER=smoke|proxy|full, SEEDS=n)"
	@echo "make table-<output>                  any output: wttm-cifar100, wttm-imagenet, ssta, ...  (repro specs)"
	@echo "     ... NPROC=2                     each run on 2 processes (torchrun + DDP; the global batch is kept)"
	@echo "     ... JOBS=1 | JOBS=4             one run at a time | 4 at once (default on a CPU: one per core; GPU: 1)"
	@echo "     ... EXECUTOR=slurm              one Slurm job per run (submitit)"
	@echo "make smoke                           every spec at the smoke tier (the CI smoke reproduction)"
	@echo "make figures TIER=smoke              render figures/ (running the smoke runs they need)"
	@echo "make bench                           KD training throughput: reference vs fast paths"
	@echo "make teachers                        fetch the public CIFAR-100 teacher checkpoints (sha256 lock in the teacher root)"

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test,analyses]'
	touch $@

test: install
	$(PYTEST) -m "not slow"

test-all: install
	$(PYTEST)

table-%: install
	$(REPRO) table $* $(RUN_ARGS)

smoke: install
	$(REPRO) smoke

figures: install
	$(REPRO) figures --tier $(TIER)

bench: install
	$(PY) -m bench

teachers: install
	$(REPRO) teachers fetch

schema: install
	$(REPRO) schema -o repro/harness/spec.schema.json

clean-smoke:
	rm -rf data/smoke
