# The user's entry points. `make` lists them. `make demo` and `make test` set everything up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# GPU=auto (the default) installs the CUDA builds where an NVIDIA driver answers
# `nvidia-smi -L`; GPU=1 forces them, GPU=0 installs the CPU builds only.
GPU    ?= auto
ifeq ($(GPU),auto)
override GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
endif
ifeq ($(GPU),1)
EXTRAS := dev,ray,cuda
STAMP  := $(VENV)/.installed-cuda
else
EXTRAS := dev,ray
STAMP  := $(VENV)/.installed
endif
CONFIG ?=
EXP    ?=
ARGS   ?=
, := ,
# `make demo WEIGHTS=random` runs offline. Random weights make no art, so that run is also
# small and short: a check that everything works, in about a minute on a laptop CPU.
WEIGHTS ?=
DEMO_ARGS := $(if $(WEIGHTS),--set model.weights=$(WEIGHTS))
ifeq ($(WEIGHTS),random)
DEMO_ARGS += --set size=128 --set optimizer.iterations=60 --set checkpoint_every=20
endif
# `make video`: the demo clip (made by a script, never committed) stylised frame by frame.
# WEIGHTS=random is the same quick offline check: 24 frames at 128 px in a few minutes on a
# 2-core CPU.
DEMO_CLIP := outputs/demo-clip.mp4
VIDEO_ARGS := $(if $(WEIGHTS),--set model.weights=$(WEIGHTS))
ifeq ($(WEIGHTS),random)
VIDEO_ARGS += --set size=128 --set optimizer.iterations=20 --set video.first_iterations=40 \
              --set checkpoint_every=10
endif

.DEFAULT_GOAL := help
.PHONY: help setup test demo video run sweep overnight doctor status report estimate bench bench-eval bench-workers bench-estimate bench-methods bench-gpu bench-tiles bench-video lint clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	@touch $@

# On an NVIDIA GPU the targets that run the tool use JAX, the backend measured fast there (see
# README, Backends and GPUs); `make run KERAS_BACKEND=tensorflow ...` overrides. Tests keep
# Keras's default.
ifeq ($(GPU),1)
demo video run sweep overnight estimate doctor bench bench-eval bench-workers bench-estimate bench-tiles bench-video: export KERAS_BACKEND ?= jax
endif

setup: $(STAMP) ## create .venv and install everything; CUDA builds on NVIDIA machines (GPU=0/1)

# The suite's files on two processes (pytest-xdist; a file's tests stay in one, with its
# module fixtures): most of a test's time is a subprocess starting or waiting, not arithmetic.
# On 2 idle cores: 507 s with 2 processes, 528 s with 3.
TEST_WORKERS ?= 2
test: $(STAMP) ## run the test suite (no network, no GPU needed; TEST_WORKERS=2)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

demo: $(STAMP) ## stylise the demo images into outputs/demo/ (WEIGHTS=random: offline check)
	$(PY) -m pipeline run configs/demo.yaml $(DEMO_ARGS) $(ARGS)

video: $(STAMP) $(DEMO_CLIP) ## stylise a demo clip into outputs/demo-video/ (WEIGHTS=random: offline check)
	$(PY) -m pipeline run configs/video.yaml $(VIDEO_ARGS) $(ARGS)

$(DEMO_CLIP): | $(STAMP)
	$(PY) scripts/make_demo_clip.py $@

run: $(STAMP) ## run a config: make run CONFIG=configs/x.yaml [ARGS="--set size=256"]
	@test -n "$(CONFIG)" || { echo "usage: make run CONFIG=path/to/config.yaml"; exit 2; }
	$(PY) -m pipeline run $(CONFIG) $(ARGS)

sweep: $(STAMP) ## run a sweep in the foreground: make sweep CONFIG=configs/sweeps/example.yaml
	@test -n "$(CONFIG)" || { echo "usage: make sweep CONFIG=path/to/config.yaml"; exit 2; }
	$(PY) -m pipeline run $(CONFIG) $(ARGS)

overnight: $(STAMP) ## run CONFIG in the background (nohup); running it again resumes
	@test -n "$(CONFIG)" || { echo "usage: make overnight CONFIG=path/to/config.yaml"; exit 2; }
	@# A dry run first, so that config errors show here and now, not in a log read tomorrow.
	@plan=$$($(PY) -m pipeline run $(CONFIG) $(ARGS) --dry-run 2>&1 >/dev/null) || \
	  { echo "$$plan"; exit 2; }; \
	case "$$plan" in *"in use by"*) echo "$$plan"; echo "already running: see make status"; exit 3;; esac; \
	exp=$${plan##* in }; mkdir -p outputs; log=outputs/overnight-$(basename $(notdir $(CONFIG))).log; \
	nohup $(PY) -m pipeline run $(CONFIG) $(ARGS) >>$$log 2>&1 </dev/null & pid=$$!; \
	sleep 3; if ! kill -0 $$pid 2>/dev/null; then wait $$pid; rc=$$?; tail -n 4 $$log; exit $$rc; fi; \
	echo "$$plan"; echo "running in the background as pid $$pid; its output goes to $$log"; \
	echo "watch: make status EXP=$$exp   stop: kill $$pid (it saves; the same make command resumes)"

doctor: $(STAMP) ## backend, devices, GPUs, versions, threads, weights: first stop when slow
	$(PY) -m pipeline doctor

status: $(STAMP) ## counts, each run's status and the time left: make status EXP=outputs/<name>
	@test -n "$(EXP)" || { echo "usage: make status EXP=outputs/<name>"; exit 2; }
	@$(PY) -m pipeline status $(EXP)

report: $(STAMP) ## report.html, contact sheet, loss curves: make report EXP=outputs/<name>
	@test -n "$(EXP)" || { echo "usage: make report EXP=outputs/<name>"; exit 2; }
	$(PY) -m pipeline report $(EXP)

estimate: $(STAMP) ## peak memory and time of each run on this machine: make estimate CONFIG=...
	@test -n "$(CONFIG)" || { echo "usage: make estimate CONFIG=path/to/config.yaml"; exit 2; }
	$(PY) -m pipeline estimate $(CONFIG) $(ARGS)

bench: $(STAMP) ## speed: vs the seed recipe, runs/hour by workers, optimisers x precisions (CPU)
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_workers.py
	$(PY) benchmarks/bench_methods.py

bench-methods: $(STAMP) ## optimisers x precisions only: make bench-methods ARGS="--reach 300"
	$(PY) benchmarks/bench_methods.py $(ARGS)

# On a GPU machine, with JAX unless KERAS_BACKEND says otherwise. TINY=1: tiny sizes and
# counts, a check that the whole table runs (on a CPU too) in a few minutes.
# Then the tile rows: one evaluation tiled against whole at 1024 px (core 512) and 2048 px
# (core 1024), and a 4096 px print tiled (core 1024) in a fresh process with its peak.
bench-gpu: $(STAMP) ## the GPU table at 512 and 1024 px: 500 iterations, memory, runs/hour by workers, tiles
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(PY) benchmarks/bench_methods.py --gpu $(if $(TINY),--tiny) $(ARGS)
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(PY) benchmarks/bench_tiles.py $(if $(TINY),--speed 256:64 --repeats 1,--speed 1024:512$(,)2048:1024 --largest 4096 --largest-core 1024)

bench-tiles: $(STAMP) ## tiled vs whole: s/evaluation at 512 (core 256) and 1024 px (core 512); ARGS="--memory"
	$(PY) benchmarks/bench_tiles.py $(ARGS)

bench-eval: $(STAMP) ## seconds per evaluation only: make bench-eval ARGS="--size 256"
	$(PY) benchmarks/bench_eval.py $(ARGS)

bench-workers: $(STAMP) ## runs per hour by --workers only: make bench-workers ARGS="--workers 1 2 4"
	$(PY) benchmarks/bench_workers.py $(ARGS)

bench-video: $(STAMP) ## video: s/frame (flow vs stylisation), flicker with/without the temporal term
	$(PY) benchmarks/bench_video.py $(ARGS)

bench-estimate: $(STAMP) ## the estimate against real runs: make bench-estimate ARGS="--sizes 256 512"
	$(PY) benchmarks/bench_estimate.py $(ARGS)

lint: $(STAMP) ## ruff over the code
	$(PY) -m ruff check pipeline tests benchmarks scripts

clean: ## remove the virtualenv and caches (outputs/ is kept)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
