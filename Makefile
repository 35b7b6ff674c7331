# forgeml: `make demo` runs the main job, `make test` the tests. Both create .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.forgeml-installed
DEMO_MODEL ?= resnet18
THREADS ?= 2

.PHONY: install demo test test-fast test-edge toolchains lint bench-cpu bench-suite conformance clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[compiler,dev,bench]"
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p demo
	$(BIN)/forgeml zoo export $(DEMO_MODEL) -o demo/$(DEMO_MODEL).onnx
	$(BIN)/forgeml compile demo/$(DEMO_MODEL).onnx -t x86-64 -o demo/$(DEMO_MODEL).fml
	$(BIN)/forgeml bench demo/$(DEMO_MODEL).fml --baseline onnxruntime --threads $(THREADS) --json demo/$(DEMO_MODEL).bench.json

# Tests that need the cross toolchains skip with the reason when they are missing (`make toolchains`
# installs them); FORGEML_REQUIRE_TOOLCHAINS=1 (CI, test-edge) fails them instead.
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Cross compilers (aarch64, riscv64), qemu-user, and Debian's arm64 package lists (for the emulated
# aarch64 Python that `forgeml verify --emulate` builds from .deb files). Idempotent; as root, or SUDO=sudo.
# Never `apt-get install python3:arm64`: it removes the host's python3.
SUDO ?=
toolchains:
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v riscv64-linux-gnu-g++ >/dev/null \
	  && command -v qemu-aarch64 >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  $(SUDO) apt-get install -y -qq g++-aarch64-linux-gnu g++-riscv64-linux-gnu qemu-user >/dev/null; }
	@dpkg --print-foreign-architectures | grep -qx arm64 || $(SUDO) dpkg --add-architecture arm64
	@apt-cache show libc6:arm64 >/dev/null 2>&1 || $(SUDO) apt-get update -qq
	@echo "toolchains: $$(which aarch64-linux-gnu-g++ riscv64-linux-gnu-g++ qemu-aarch64 | tr '\n' ' ')"

test-edge: $(STAMP) toolchains
	FORGEML_REQUIRE_TOOLCHAINS=1 $(BIN)/python -m pytest -q tests/test_targets.py tests/test_edge.py tests/test_rpc_server.py

lint: $(STAMP)
	$(BIN)/ruff check .

bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/cpu.py --threads $(THREADS)

bench-suite: $(STAMP)
	$(BIN)/python -m pytest benchmarks/test_latency.py --benchmark-group-by=param:name

# The whole ONNX backend suite (2,024 cases) for forgeml, raw TVM and ONNX Runtime, a worker process per job
# (~20 min on 2 cores) -> benchmarks/results/onnx_conformance.{md,json}
conformance: $(STAMP)
	$(BIN)/python benchmarks/onnx_conformance.py --engines forgeml,forgeml-noverify,tvm,onnxruntime --jobs $(THREADS)

clean:
	rm -rf demo .pytest_cache build *.egg-info
