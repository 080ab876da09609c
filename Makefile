# The README's first two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/optcc demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/optcc bench demo --passes bn_reparam
	$(BIN)/optcc bench timm:efficientnet_lite0 --passes bn_reparam

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
