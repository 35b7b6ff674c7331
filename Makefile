# forgeml: `make demo` runs the main job, `make test` the tests. Both create .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.forgeml-installed
DEMO_MODEL ?= resnet18
THREADS ?= 2

.PHONY: install demo test test-fast lint bench-cpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[compiler,dev]"
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p demo
	$(BIN)/forgeml zoo export $(DEMO_MODEL) -o demo/$(DEMO_MODEL).onnx
	$(BIN)/forgeml compile demo/$(DEMO_MODEL).onnx -t x86-64 -o demo/$(DEMO_MODEL).fml
	$(BIN)/forgeml bench demo/$(DEMO_MODEL).fml --baseline onnxruntime --threads $(THREADS) --json demo/$(DEMO_MODEL).bench.json

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/cpu.py --threads $(THREADS)

clean:
	rm -rf demo .pytest_cache build *.egg-info
