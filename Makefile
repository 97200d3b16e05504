# The commands a user types. Everything runs in a virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test test-fast lint clean run demo jupyter

# glibc's malloc backs TensorFlow's large buffers with transparent huge pages: on a 2-core CPU the training
# steps of `cpu-small` ran 38% faster (docs/benchmarks.md, "allocator"). Ignored where glibc has no such
# tunable (before 2.35, or another libc); a GLIBC_TUNABLES of your own is kept.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

# `make run`: the notebook, headless, on the real dataset (downloaded when absent); the run folder is named by its
# settings and recipe under models/, and the executed notebook is models/main-$(PRESET).ipynb.
#   make run PRESET=seed-resnet50
PRESET ?= cpu-small
DATA ?= cifar-100-python
DEMO_DATA := synthetic-data/cifar-100-python

install: $(INSTALLED)

$(INSTALLED): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -e ".[dev]"
	touch $(INSTALLED)

# TESTS_IN_PARALLEL processes share the tests (pytest-xdist), a file each (its trained run is made once); 0 runs
# them in this process.
TESTS_IN_PARALLEL ?= 2
test: $(INSTALLED)
	$(PY) -m pytest -n $(TESTS_IN_PARALLEL) --dist loadfile

# the quick tier: the suite without the tests marked slow
test-fast: $(INSTALLED)
	$(PY) -m pytest -m "not slow"

lint: $(INSTALLED)
	$(PY) -m ruff check cifar100 tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

run: $(INSTALLED)
	$(PY) -m cifar100 data verify $(DATA) >/dev/null 2>&1 || $(PY) -m cifar100 data download $(DATA)
	mkdir -p models
	$(PY) -m papermill main.ipynb models/main-$(PRESET).ipynb -p PRESET $(PRESET) -p DATA_DIR $(DATA) -p VERBOSE 2
	@echo "executed notebook: models/main-$(PRESET).ipynb"

# `make demo`: the same notebook on a small SYNTHETIC dataset (not CIFAR-100), in a few minutes on a CPU.
demo: $(INSTALLED)
	test -d $(DEMO_DATA) || $(PY) -m cifar100 data synthetic $(DEMO_DATA) --train 6000 --test 1000
	mkdir -p models
	$(PY) -m papermill main.ipynb models/main-demo.ipynb -p PRESET smoke -p DATA_DIR $(DEMO_DATA) \
		-p IMAGE_SIZE 64 -p DOWNLOAD False -p VERBOSE 2 -y "SETTINGS: {max_train_images: null}"
	@echo "executed notebook: models/main-demo.ipynb (SYNTHETIC data)"

# `make jupyter`: the notebook in JupyterLab, from the project's environment (as root too, e.g. in a container).
jupyter: $(INSTALLED)
	$(PY) -m jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) main.ipynb
