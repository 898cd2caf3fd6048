.DEFAULT_GOAL := help

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: ## editable install with test/lint tools
	python -m pip install -e ".[dev]"

test: ## the CI suite (GPU / network tests skip themselves)
	python -m pytest -q

test-distributed: ## the multi-process runs: torchrun nodes, the SLURM cluster, DDP sweeps
	python -m pytest -q -m distributed

test-fast: ## skip the slow end-to-end tests
	python -m pytest -q -m "not slow"

test-gpu: ## GPU tests only (needs CUDA)
	python -m pytest -q -m gpu

format: ## ruff lint (with fixes) and format
	ruff check --fix . && ruff format .

smoke: ## the seconds-long smoke run
	python train.py experiment=smoke

quickstart: ## the README quick start training run (tiny backbone, sample photos, CPU)
	python train.py experiment=quickstart
