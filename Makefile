# Two commands do all the set-up on a fresh machine:
#   make demo   run the workflow on the embedded demo (CPU)
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: demo test test-slow test-slurm test-all slurm-deps lint install clean

# The pinned stack, then the library itself (editable, so the venv imports this checkout).
$(BIN)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(BIN)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/snakemake --cores $(CORES)

# Three disjoint tiers; .ci/run runs all three. README says how long each takes.
PYTEST := HF_HUB_OFFLINE=1 PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q

test: install
	$(PYTEST)

# Two pytest-xdist workers, one test file each at a time (module fixtures build their
# store once): most of a workflow test is single-threaded start-up and I/O, so two
# share 2 cores well (21 min 53 s against 33 min 7 s in one process, same machine).
test-slow: install
	$(PYTEST) -m "slow and not slurm" -n 2 --dist loadfile

test-all: test test-slow test-slurm

# The SLURM tests start a throwaway single-node cluster (Debian's slurm-wlm and
# munge, run as root). Without root or apt-get they skip with one line saying why.
slurm-deps:
	@if [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; \
	else echo "slurm-deps: not root or no apt-get: the SLURM tests will skip"; fi

test-slurm: install slurm-deps
	$(PYTEST) -m slurm

lint: install
	$(BIN)/snakemake --lint --cores 1
	$(BIN)/snakefmt --check .
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf results .snakemake
