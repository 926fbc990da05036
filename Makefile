# Two commands for a newcomer (see README.md):
#   make tutorial   set up .venv and run every notebook, in order, headless
#   make test       set up .venv and run the test suite (incl. notebooks, smoke size)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of PyTorch; on a machine with a GPU set TORCH="torch" (or follow
# pytorch.org's selector) before the first `make`.
TORCH  ?= torch==2.13.0

.PHONY: setup tutorial test bench clean-cache

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

tutorial: setup
	$(PY) scripts/run_tutorial.py

test: setup
	MEMDEC_SMOKE=1 $(PY) -m pytest --nbval-lax tests notebooks

bench: setup
	$(PY) benchmarks/bench_extraction.py

clean-cache:
	rm -rf data/cache data/artifacts
