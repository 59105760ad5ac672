# A newcomer's two commands: `make demo` and `make test`. Both create .venv and install when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)
export MEDSSL_DATA ?= $(abspath ../shared/data)
DEMO_OUT ?= demo_out

.PHONY: install test lint demo clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check pretrain curation eval launch tests bench
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff format pretrain curation eval launch tests bench
	$(VENV)/bin/ruff check --fix pretrain curation eval launch tests bench

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO_OUT)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
