# make venv  - .venv with the pinned requirements and a "python3" Jupyter kernel running it
# make test  - the whole test suite (builds the venv first if needed): what CI and the README run
# make test-fast - the quick tier for the edit-test loop: the suite less the tests marked slow (notebooks,
#              torchrun jobs, the shared-checkpoint BN checks, the studies' replays)
# make lint  - ruff: lint and format check (config in pyproject.toml); `make format` applies the formatter
# make run   - the main job on the embedded digits data, then logs -> json/digits/ -> results/digits/ (json/digits only: the other json/ folders hold the CIFAR-10 tables)
#              (`make run NPROC=2`: the same job in 2 processes under torchrun, same numbers; README)
# make clean - remove json/ and results/digits/ (logs/ and the baseline cache in .cache/ are kept)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_FLAGS ?= -q -x -p no:cacheprovider --durations=15

# Spinning OpenMP workers make MKL's small eigendecompositions 100-1000x slower whenever the cores are
# shared (a notebook kernel beside pytest, other jobs): let waiting threads sleep.
export OMP_WAIT_POLICY ?= PASSIVE
export PYTHONDONTWRITEBYTECODE := 1

# The demo (see README, Quick start): every method at 20x conv MACs (digits is too easy to separate them at
# 3x: at 10x uniform, energy and vbmf are still within one test image of the baseline), 3 seeds, a
# 12-candidate search budget, a quarter epoch of finetuning, each final model's BN statistics from 256 train
# images. Measured 8.5 min with the baseline training on an idle 2-core Xeon (2026-11-30), 9.2 on an AMD EPYC
# (2026-12-07); the venv build adds 2-4 min (README, Quick start).
RUN_ARGS ?= --model resnet18 --dataset digits --targets 20 --n-seeds 3 --search-budget 12 \
	--methods guided,uniform,energy,vbmf,random,tpe,policy \
	--finetune-epochs 0.25 --finetune-batch-size 32 --calib-images 128 --val-images 0 --final-calib-images 256 \
	--sensitivity-levels 0.3 --run-id make-run
NPROC ?= 1
LAUNCH = $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m torch.distributed.run --standalone --nproc-per-node $(NPROC))

.PHONY: venv test test-fast lint format run clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (htd .venv)"
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_FLAGS)

test-fast: venv
	$(PY) -m pytest $(PYTEST_FLAGS) -m "not slow"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

run: venv
	$(LAUNCH) -m common.run $(RUN_ARGS)
	$(PY) jsonify_logs.py logs --out json/digits
	$(PY) analyze_results.py --json json/digits --out results/digits

clean:
	rm -rf json results/digits
