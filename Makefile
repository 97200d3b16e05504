# The commands a user types. Everything runs in a virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test test-fast lint clean run demo jupyter questions

# glibc's malloc backs TensorFlow's large buffers with transparent huge pages: on a 2-core CPU the training
# steps of `cpu-small` ran 38% faster (docs/benchmarks.md, "allocator"). Ignored where glibc has no such
# tunable (before 2.35, or another libc); a GLIBC_TUNABLES of your own is kept.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

# `make run`: the notebook, headless, on the real dataset (downloaded when absent).
#   make run PRESET=seed-resnet50 RUN=resnet50-224   (any preset; the run folder is models/$(RUN))
PRESET ?= cpu-small
RUN ?= $(PRESET)
DATA ?= cifar-100-python
DEMO_DATA := synthetic-data/cifar-100-python

install: $(INSTALLED)

$(INSTALLED): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -e ".[dev]"
	touch $(INSTALLED)

# TESTS_IN_PARALLEL processes share the tests (pytest-xdist): many wait on a subprocess, a kernel or Python's
# imports, so two halve the suite's time on 2 cores. TESTS_IN_PARALLEL=0 runs them in this process.
TESTS_IN_PARALLEL ?= 2
test: $(INSTALLED)
	$(PY) -m pytest -n $(TESTS_IN_PARALLEL)

# the quick tier (about a minute): the suite without the tests marked slow (over about 5 s each)
test-fast: $(INSTALLED)
	$(PY) -m pytest -m "not slow"

lint: $(INSTALLED)
	$(PY) -m ruff check cifar100 tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

run: $(INSTALLED)
	$(PY) -m cifar100 data verify $(DATA) >/dev/null 2>&1 || $(PY) -m cifar100 data download $(DATA)
	mkdir -p models/$(RUN)
	$(PY) -m papermill main.ipynb models/$(RUN)/main.ipynb -p PRESET $(PRESET) -p DATA_DIR $(DATA) \
		-p RUN_NAME $(RUN) -p VERBOSE 2
	@echo "executed notebook: models/$(RUN)/main.ipynb"

# `make demo`: the same notebook on a small SYNTHETIC dataset (not CIFAR-100), in a few minutes on a CPU.
demo: $(INSTALLED)
	test -d $(DEMO_DATA) || $(PY) -m cifar100 data synthetic $(DEMO_DATA) --train 6000 --test 1000
	rm -rf models/demo && mkdir -p models/demo
	$(PY) -m papermill main.ipynb models/demo/main.ipynb -p PRESET smoke -p DATA_DIR $(DEMO_DATA) \
		-p RUN_NAME demo -p IMAGE_SIZE 64 -p DOWNLOAD False -p VERBOSE 2 -y "SETTINGS: {max_train_images: null}"
	@echo "executed notebook: models/demo/main.ipynb (SYNTHETIC data)"

# `make questions`: the original project's two questions on the SYNTHETIC demo data (not CIFAR-100): 32 px
# against upsampled to 64 px, and hard-example mining on against off (2 seeds each); then the comparison.
# The smoke preset has mining off, so the 32 px runs of seeds 0 and 1 are the "off" runs and the last two
# are the "on" runs. Each set of settings has its own run folder in models/, so a second call trains nothing.
QUESTIONS := "image_size=32 seed=0" "image_size=64 seed=0" "image_size=32 seed=1" \
	"image_size=32 seed=0 hem=true" "image_size=32 seed=1 hem=true"
questions: $(INSTALLED)
	test -d $(DEMO_DATA) || $(PY) -m cifar100 data synthetic $(DEMO_DATA) --train 6000 --test 1000
	for settings in $(QUESTIONS); do \
		$(PY) -m cifar100 train --preset smoke --data $(DEMO_DATA) --verbose 2 --set max_train_images=None \
			$$(for s in $$settings; do printf -- '--set %s ' $$s; done) || exit 1; \
	done
	$(PY) -m cifar100 compare models

# `make jupyter`: the notebook in JupyterLab, from the project's environment (as root too, e.g. in a container).
jupyter: $(INSTALLED)
	$(PY) -m jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) main.ipynb
