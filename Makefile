# GrowCLIP: the two commands in README.md set everything up on a fresh machine.
#   make test         create .venv (pinned deps, CPU torch) and run the test suite
#   make demo         build the offline corpus if missing, run the 3-stage growth plan, print the table
# Others:
#   make lint         ruff lint + format check
#   make reference    CLIP_benchmark's code (no dependencies) in .venv/reference, the reference of the eval tests
#   make slurm-up     start a real single-node SLURM on this machine (root; see slurm/local/README.md)
#   make slurm-down   stop exactly the daemons slurm-up started
#   make slurm-status show the local cluster's daemons, nodes and queue
#   make fuzz         the randomised reliability tests with fresh random seeds (FUZZ_ROUNDS, default 20)
#   make experiments  the experiment suite, 23 runs (2 h 16 min on 2 CPU cores, measured 2026-12-01), then docs/results.md
#   make check-configs validate every config under configs/
#   make data-sources install the Debian packages of the offline corpus (root; else say which)
#   make img2dataset-example  img2dataset itself crawls a loopback server; ingest takes its webdataset and parquet outputs
#   make autopilot-demo  growth on autopilot: crawls land in an inbox and become stages with no command in between
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The venv is (re)installed when the content of the pin files changes, not their mtime:
# the stamp's name carries a hash of requirements.txt + constraints.txt.
DEPS_HASH := $(shell cat requirements.txt constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.deps-$(DEPS_HASH)
PYTEST_ARGS ?=

# Debian packages behind `python -m data_tools build-offline` (files it reads, package that ships them).
DATA_SOURCES := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz:dataset-fashion-mnist \
                /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf:fonts-noto-color-emoji

.PHONY: venv reference test fuzz demo experiments lint format slurm-up slurm-down slurm-status check-configs data-sources img2dataset-example autopilot-demo clean

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -r requirements.txt
	@rm -f $(VENV)/.deps-*
	@touch $@
	@echo "venv ready: $(VENV) (deps $(DEPS_HASH))"

# CLIP_benchmark 1.6.2, the reference tests/test_eval_clip_benchmark.py holds our evaluation to: its own code only
# (--no-deps: its open_clip, pycocoevalcap and requests are not needed for its readers, metrics and JSON; ~2 MB,
# a few seconds), in a folder the test puts on sys.path over the venv's torch, numpy, scikit-learn and webdataset.
REFERENCE := $(VENV)/reference
CLIP_BENCHMARK := clip-benchmark==1.6.2
REF_STAMP := $(REFERENCE)/.$(CLIP_BENCHMARK)

reference: $(REF_STAMP)

$(REF_STAMP): | $(STAMP)
	rm -rf $(REFERENCE)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --target $(REFERENCE) $(CLIP_BENCHMARK)
	@touch $@

test: $(STAMP) $(REF_STAMP) data-sources
	GROWCLIP_CLIP_BENCHMARK=$(REFERENCE) $(PY) -m pytest $(PYTEST_ARGS)

# make test runs the fuzz and SIGKILL tests on fixed seeds (deterministic CI); this explores new ones.
# A failure prints its seed; replay it with GROWCLIP_FUZZ_SEED=N / GROWCLIP_KILL_SEED=N.
FUZZ_ROUNDS ?= 20
fuzz: $(STAMP) data-sources
	@log=$$(mktemp); trap 'rm -f "$$log"' EXIT; \
	run() { "$$@" >"$$log" 2>&1; rc=$$?; grep -E "(fuzz|kill) seed|passed|failed|skipped|error" "$$log"; \
	  if [ $$rc != 0 ]; then tail -60 "$$log"; exit $$rc; fi; }; \
	for i in $$(seq $(FUZZ_ROUNDS)); do \
	  GROWCLIP_FUZZ_SEED=random run $(PY) -m pytest -q -rA -p no:cacheprovider tests/test_reliability_data.py; \
	  GROWCLIP_FUZZ_SEED=random run $(PY) -m pytest -q -rA -p no:cacheprovider tests/test_fuzz_ingest_inputs.py \
	    tests/test_fuzz_cli_inputs.py; \
	done; \
	GROWCLIP_KILL_SEED=random run $(PY) -m pytest -q -rA -p no:cacheprovider tests/test_reliability_kill.py

data-sources:
	@missing=""; for pair in $(DATA_SOURCES); do \
	  test -e "$${pair%%:*}" || missing="$$missing $${pair##*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing offline data sources:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
	  echo "warning: offline data sources missing:$$missing (install them as root: apt-get install$$missing);" \
	       "tests that build the offline corpus will be skipped" >&2; \
	fi

# make demo: configs/demo.yaml on data/offline (32 px images, 2048-token tokenizer = the config's
# model.image.image_size / model.text.vocab_size) with the local executor; DEMO_EXECUTOR=slurm uses
# the cluster of `make slurm-up` (then `python -m jobs status $(DEMO_RUN)` follows it). Re-running
# skips finished stages and prints the table again.
DEMO_DATA ?= data/offline
DEMO_RUN ?= runs/demo
DEMO_EXECUTOR ?= local
DEMO_PAIRS ?= 1000

demo: $(STAMP) data-sources
	@test -f $(DEMO_DATA)/manifest.json || $(PY) -m data_tools build-offline $(DEMO_DATA) \
	  --pairs-per-stage $(DEMO_PAIRS) --image-size 32 --vocab-size 2048 > /dev/null
	GROWCLIP_LOG_LEVEL=$${GROWCLIP_LOG_LEVEL:-WARNING} $(PY) -m jobs submit --config configs/demo.yaml \
	  --run-dir $(DEMO_RUN) --executor $(DEMO_EXECUTOR) --wait --set data.root=$(DEMO_DATA)

# make experiments: every run of configs/experiments/suite.yaml on data/experiments-iid (built if missing:
# the corpus grows like crawled data, every stage a fresh disjoint sample of one pool, 3000/6000/12000
# pairs; EXPERIMENT_GROWTH=domains EXPERIMENT_DATA=data/experiments gives the continual-learning corpus),
# EXPERIMENT_JOBS at a time (resumable: finished runs are skipped), then docs/results.md + docs/results/.
# On a GPU machine: EXPERIMENT_ARGS="--set cluster.gpus_per_node=1 --threads 2" EXPERIMENT_JOBS=13.
EXPERIMENT_GROWTH ?= iid
EXPERIMENT_DATA ?= data/experiments-iid
EXPERIMENT_ROOT ?= runs/experiments
EXPERIMENT_JOBS ?= 1
EXPERIMENT_ARGS ?=
EXPERIMENT_SIZES_iid := --stage-sizes 3000,6000,12000
EXPERIMENT_SIZES_domains := --pairs-per-stage 3000

experiments: $(STAMP) data-sources
	@test -f $(EXPERIMENT_DATA)/manifest.json || $(PY) -m data_tools build-offline $(EXPERIMENT_DATA) \
	  --growth $(EXPERIMENT_GROWTH) $(EXPERIMENT_SIZES_$(EXPERIMENT_GROWTH)) --image-size 32 --vocab-size 2048 > /dev/null
	$(PY) -m jobs.experiments run --root $(EXPERIMENT_ROOT) --jobs $(EXPERIMENT_JOBS) \
	  --set data.root=$(EXPERIMENT_DATA) $(EXPERIMENT_ARGS)
	$(PY) -m jobs.experiments summarize --root $(EXPERIMENT_ROOT)

# make img2dataset-example: examples/img2dataset/run.sh (issue #19). img2dataset and its dependencies
# (albumentations, opencv, pandas, wandb, ...) go in their own venv, IMG2DATASET_VENV (default git-ignored), made on
# first use (~45 s from a local PyPI mirror); the crawl and both ingests then take ~30 s. WORK=DIR keeps the
# output there (default: a new temp dir). `GROWCLIP_IMG2DATASET=$(IMG2DATASET_VENV) make test` runs the crawl test.
IMG2DATASET_VENV ?= .venv-img2dataset

img2dataset-example: $(STAMP)
	IMG2DATASET_VENV=$(IMG2DATASET_VENV) PYTHON=$(PY) examples/img2dataset/run.sh

# make autopilot-demo: examples/autopilot/demo.sh (issue #20): `jobs autopilot` polls in the background (local executor)
# while three crawls land in its inbox; two stages are made, grown and evaluated with no command in between (~3 min on
# 2 cores). Needs the offline corpus's eval sets (built here like make demo). AUTOPILOT_DIR (default
# /tmp/growclip-autopilot) holds the inbox, the corpus and the run.
autopilot-demo: $(STAMP) data-sources
	@test -f $(DEMO_DATA)/manifest.json || $(PY) -m data_tools build-offline $(DEMO_DATA) \
	  --pairs-per-stage $(DEMO_PAIRS) --image-size 32 --vocab-size 2048 > /dev/null
	PY=$(PY) EVAL_DIR=$(DEMO_DATA)/eval examples/autopilot/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

check-configs: $(STAMP)
	@for f in configs/*.yaml; do $(PY) -m jobs check-config $$f > /dev/null && echo "ok  $$f" || exit 2; done

slurm-up:
	slurm/local/up

slurm-down:
	slurm/local/down

slurm-status:
	slurm/local/status

clean:
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
