# Two commands do all set-up on a fresh machine:
#   make reproduce   create .venv, install, run every notebook (smoke profile, CPU, offline) into results/, rebuild the report
#   make test        same set-up, then unit tests + nbval over the committed notebooks
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

.PHONY: setup reproduce test report clean-smoke

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
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
test: setup
	$(BIN)/python -m pytest -q tests notebooks --nbval --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

clean-smoke:
	rm -rf results/*/smoke-*
