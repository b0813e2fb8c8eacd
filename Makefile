# Two commands do all set-up on a fresh machine:
#   make reproduce   create .venv, install, run every notebook (smoke profile, CPU, offline) into results/, rebuild the report
#   make test        same set-up, then unit tests + nbval over the committed notebooks
# The environment is pinned in requirements.lock; `make lock` re-resolves it, `make notebooks` re-executes the
# committed smoke notebooks (do both together, then `make test`, and commit all of it).
# Paper configurations: make reproduce PROFILE=full DEVICE=cuda KDNB_DATA=/path/to/data
#   (downloads what is missing into the data folder; DOWNLOAD=False to forbid it)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= smoke
DEVICE  ?= cpu
# reduced/full may fetch what is missing (datasets, pretrained weights) through torchvision; smoke never does
DOWNLOAD ?= $(if $(filter smoke,$(PROFILE)),False,True)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
export PIP_DISABLE_PIP_VERSION_CHECK = 1
# two CPU threads is what CI has; more only slows small models down through contention
export OMP_NUM_THREADS ?= 2
# libgomp's default spin-wait collapses under any other load on the machine (25x slower on 2 busy cores); passive
# waiting costs nothing measurable when the machine is quiet
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup reproduce test report clean-smoke lock notebooks

# exact versions from the lock, then kdnb itself without re-resolving anything
$(VENV)/.installed: pyproject.toml requirements.lock Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --env OMP_WAIT_POLICY PASSIVE >/dev/null
	touch $@

setup: $(VENV)/.installed

reproduce: setup
	@for nb in $(NOTEBOOKS); do \
	  $(BIN)/kdnb run $$nb --profile $(PROFILE) --device $(DEVICE) -p download $(DOWNLOAD) || exit 1; \
	done
	$(BIN)/kdnb report

report: setup
	$(BIN)/kdnb report

# data tests read the real datasets when they sit beside the checkout (as in CI); skipped otherwise
SHARED_DATA := $(wildcard $(abspath ../shared/datasets))
test: export KDNB_DATA ?= $(SHARED_DATA)
# the checkout's own cache: smoke teachers cached by another checkout (other code) never answer for this one
test: export KDNB_CACHE ?= $(CURDIR)/.cache/kdnb
test: setup
	$(BIN)/python -m pytest -q tests notebooks --nbval --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

clean-smoke:
	rm -rf results/*/smoke-*

# re-resolve pyproject.toml's version ranges in a throw-away venv and write every installed version to the lock
# LOCK_CAPS: the highest torch/torchvision some of our machines' pip configuration allows; the lock must install there
LOCK_CAPS ?= "torch<=2.14.1" "torchvision<=0.29.1"
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q -e . $(LOCK_CAPS)
	{ sed -n '/^#/p' requirements.lock; .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^kdnb'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

# re-execute the committed notebooks in place with their defaults (smoke, CPU): after a lock or code change
notebooks: export KDNB_CACHE ?= $(CURDIR)/.cache/kdnb
notebooks: setup
	@for nb in $(NOTEBOOKS); do \
	  echo "$$nb"; $(BIN)/papermill --no-progress-bar --cwd notebooks $$nb $$nb || exit 1; \
	done

# issue 17, CUDA evidence: pack the data the GPU call carries into .device/data and print the device tool's command
# (benchmarks/gpu_evidence.py's docstring says how to fire it); DRY=1 runs the whole sequence here on CPU, tiny sizes.
# GPU_EVIDENCE_ARGS passes more, e.g. GPU_EVIDENCE_ARGS="--parts ad"
.PHONY: gpu-evidence
gpu-evidence: export KDNB_DATA ?= $(SHARED_DATA)
gpu-evidence: setup
	$(BIN)/python benchmarks/gpu_evidence.py $(if $(DRY),--dry,--prepare) $(GPU_EVIDENCE_ARGS)

# issue 16: the speed benchmarks, one after another (each a few minutes at most; interleaved reps, ratios with their
# spread). Not part of `make test`: speed is measured here, never as timed tests
BENCHMARKS := bench_01_mnist_epoch.py bench_03_fmnist_pipeline.py bench_05_cifar_pipeline.py \
              bench_resnet_precision.py bench_thread_policy.py
.PHONY: benchmark
benchmark: export KDNB_DATA ?= $(SHARED_DATA)
benchmark: setup
	@for b in $(BENCHMARKS); do echo "== $$b"; $(BIN)/python benchmarks/$$b || exit 1; done
	$(BIN)/python benchmarks/bench_05_cifar_pipeline.py --with-model
	$(BIN)/python benchmarks/bench_thread_policy.py --workload mlp
