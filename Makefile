# Two commands for a newcomer (see README.md):
#   make tutorial   set up .venv and run every notebook, in order, headless
#                   (quick size; `make tutorial FULL=1` for the full size)
#   make test       set up .venv and run the test suite (incl. notebooks, smoke size)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of PyTorch; on a machine with a GPU set TORCH="torch" (or follow
# pytorch.org's selector) before the first `make`.
TORCH  ?= torch==2.13.0

.PHONY: setup tutorial test bench app chromium clean-cache colab-links gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

FULL ?=

tutorial: setup
	$(PY) scripts/run_tutorial.py $(if $(FULL),--param FULL=$(FULL))

test: setup chromium
	MEMDEC_SMOKE=1 $(PY) -m pytest --nbval-lax tests notebooks

# The real-browser test of the chat panel drives Debian's Chromium.
chromium:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "The browser test needs: sudo apt-get install chromium chromium-driver"; \
	  fi; \
	fi

# The chat panel of notebook 05 as a standalone web app.
app: setup
	$(VENV)/bin/voila notebooks/05_chat_panel.ipynb

bench: setup
	$(PY) benchmarks/bench_extraction.py
	$(PY) benchmarks/bench_fastpath.py
	$(PY) benchmarks/bench_datastore.py
	$(PY) benchmarks/bench_decoder.py
	$(PY) benchmarks/bench_finetune.py
	$(PY) benchmarks/bench_sampling.py

# The repository address lives in pyproject.toml ([project.urls]); this writes it into every
# Colab badge and setup cell: make colab-links REPO=owner/name
colab-links:
	$(PYTHON) scripts/colab_links.py $(if $(REPO),--set $(REPO))

# Devices: the five notebooks at smoke size + the helpers' device paths on a CUDA GPU
# (or, without one, on the pretend GPU of helpers/devicecheck.py: make gpu-check FAKE=1).
gpu-check: setup
	$(PY) scripts/gpu_check.py $(if $(FAKE),--fake-gpu)

clean-cache:
	rm -rf data/cache data/artifacts
