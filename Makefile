# Two commands do all the set-up on a fresh machine:
#   make demo   run the workflow on the embedded demo (CPU)
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: demo test test-all lint install clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

install: $(BIN)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/snakemake --cores $(CORES)

test: install
	HF_HUB_OFFLINE=1 PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q

test-all: install
	HF_HUB_OFFLINE=1 PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -m ""

lint: install
	$(BIN)/snakemake --lint --cores 1
	$(BIN)/snakefmt --check .

clean:
	rm -rf results .snakemake
