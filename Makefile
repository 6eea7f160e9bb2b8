# gestalt-xai — the README's commands call these targets.
#   make demo   create .venv, install, run the embedded demo study into runs/demo
#   make test   install if needed, run the whole test suite
#   make bench  print speed/memory ratios measured on this machine
SHELL  := /bin/bash
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
RUN    ?= runs/demo

.PHONY: install browser demo test bench lint clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/gestalt-xai study run pipelines/demo.yaml --run $(RUN)

# the questionnaire booklet's browser test drives Debian's chromium through Playwright (`playwright install` downloads
# browsers and cannot work offline); installed here when running as root (as CI does), skipped with a reason otherwise
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; fi

test: install browser
	$(PY) -m pytest

bench: install
	@mkdir -p benchmarks/results; set -o pipefail; \
	for script in benchmarks/*.py; do name=$$(basename $$script .py); echo "== $$script"; \
	  $(PY) $$script | tee benchmarks/results/$$name.txt || exit 1; done

lint: install
	$(VENV)/bin/ruff check gestalt_xai tests benchmarks

clean-runs:
	rm -rf runs/
