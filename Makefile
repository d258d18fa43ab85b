# stockpot: the two set-up commands are `make demo` and `make test`; both are idempotent and
# install what they need (a Debian 12 machine, as root) into .venv.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stockpot-installed
# Debian's python3 lacks venv and ensurepip until python3-venv is installed.
NEED_VENV := $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip; }

.PHONY: venv demo soup-demo merge-demo test test-torch lint bench chaos services clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints/dev.txt
	@$(NEED_VENV)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch alone first: that takes the CPU build on this disk; resolved together with the rest,
	# pip's backtracking (s3fs/aiobotocore vs boto3) has picked PyPI's multi-GB CUDA build instead.
	$(BIN)/python -m pip install -q -c constraints/dev.txt torch
	# Then everything else in one command: s3fs and moto must resolve together (aiobotocore pins
	# botocore). The constraint keeps the torch above: the package itself accepts a range.
	$(BIN)/python -m pip install -q -c constraints/dev.txt -e '.[dev]'
	@touch $(STAMP)

# Trains configs/demo.yaml on 2 local ranks, interrupts it with SIGUSR2 midway, resumes it,
# then makes a checkpoint soup of the run (best single checkpoint vs soup on the test split).
demo: venv
	$(BIN)/python -m launch.demo configs/demo.yaml

# Pretrains once, fine-tunes 8 ingredients from it (seeds x lrs), soups them (uniform, greedy,
# learned); prints best single vs soups on the test split; README=1 rewrites README's table.
soup-demo: venv
	$(BIN)/python -m launch.soup_demo configs/soup-demo.yaml $(if $(README),--readme)

# Per seed (3): a constant-LR CharLM run, its decay branch (wsd) from step T-D, and merges of its
# last D steps' checkpoints (window recipe rules) and its EMA; held-out bits per byte of each,
# mean and spread over seeds; README=1 rewrites README's table and docs/merge-demo.png.
merge-demo: venv
	$(BIN)/python -m launch.merge_demo configs/merge-demo.yaml $(if $(README),--readme)

# Starts the real services the tests need (Slurm here; the S3 server is started by the tests),
# then runs the whole suite. Under CI=true (.ci/run sets it) the Slurm and S3 tests must run,
# never skip; without it a service that cannot start skips its tests, and the run ends with a
# loud line naming them and why (tests/conftest.py).
test: venv services
	$(BIN)/python -m pytest

services:
	slurm/dev-cluster start

# The tests that lean on torch's checkpoint (DCP), FSDP2 and serialization APIs, against another
# torch in a venv of its own (.venv-torch-<version>), installed as a user would: that torch
# first, then this package with no constraint, which must leave it in place. The `vision` extra
# (timm, torchvision) goes in here only: torchvision's builds pin their torch, and PyPI's do not
# import beside the main venv's 2.13.0. No Slurm tests: the cluster's jobs run the main venv. CI
# runs it for the newest torch pip serves (.ci/run).
TORCH ?= 2.14.1
TORCH_VENV := .venv-torch-$(TORCH)
TORCH_TESTS := tests/format tests/test_checkpointer.py tests/test_checkpointer_async.py \
	tests/test_checkpointer_restore.py tests/test_checkpoint_dist.py \
	tests/test_checkpoint_kills.py tests/test_async_snapshot.py tests/test_resume_exact.py \
	tests/test_retention.py tests/test_sharding.py tests/test_training_options.py \
	tests/test_library_models.py tests/test_soup.py tests/test_soup_dist.py \
	tests/test_soup_rules.py tests/test_soup_stream.py tests/test_soup_memory.py \
	tests/test_strict_warnings.py tests/test_api.py tests/test_loader.py \
	tests/test_training_extras.py tests/test_examples.py tests/test_tiers.py

test-torch: $(TORCH_VENV)/.stockpot-installed
	$(TORCH_VENV)/bin/python -m pytest -m "not slurm" $(TORCH_TESTS)

$(TORCH_VENV)/.stockpot-installed: pyproject.toml
	@$(NEED_VENV)
	@test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	@start=$$SECONDS; set -e; \
	$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip; \
	$(TORCH_VENV)/bin/python -m pip install -q "torch==$(TORCH)"; \
	$(TORCH_VENV)/bin/python -m pip install -q -e '.[dev,vision]'; \
	echo "torch $(TORCH) and stockpot installed in $$(( SECONDS - start )) s"
	@$(TORCH_VENV)/bin/python -c 'import sys, torch; v = torch.__version__.split("+")[0]; \
	sys.exit(None if v == "$(TORCH)" else f"pip install -e . replaced torch $(TORCH) by {v}: widen the torch range in pyproject.toml")'
	@touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Speed figures as ratios against baselines measured in the same run (bench/run.py): quick mode
# (~300 MB of state, < 5 min on 2 cores); FULL=1 for ~1 GB; README=1 rewrites README's table;
# BENCH_ARGS for sizes and sections, e.g. BENCH_ARGS="--d-model 768 --n-layers 6 --only save".
bench: venv
	$(BIN)/python -m bench.run $(if $(FULL),--full) $(if $(README),--readme) $(BENCH_ARGS)

# Chaos trials on real 2-rank jobs (bench/chaos): SIGKILLs, S3 faults, a full disk, a hung rank,
# corrupted files, bad storage set-ups; each must lose nothing and resume bit-identical. Quick mode
# (22 trials, < 10 min on 2 quiet cores); TRIALS=N for more; README=1 rewrites README's table;
# CHAOS_ARGS e.g. "--only kill s3 --s3-fault-rate 0.1". Needs root (tmpfs mounts).
chaos: venv
	$(BIN)/python -m bench.chaos $(if $(TRIALS),--trials $(TRIALS)) $(if $(README),--readme) $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .venv-torch-* .pytest_cache .mypy_cache .ruff_cache *.egg-info
