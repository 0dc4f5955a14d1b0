# medaudit: every target sets itself up (virtual environment + install) on a fresh machine.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml clients/pyproject.toml | sha256sum | cut -c1-12)
OUT     ?= artifacts
PYTEST_ARGS ?=
LOAD_ARGS ?=

.PHONY: help install system wheels bento demo test test-fast lint format bench load soak train clean

help:
	@echo "make demo   train, correct and register the demo versions on synthderm, then serve them on :3000"
	@echo "make test   run the whole test suite (what CI runs)"
	@echo "make lint   ruff format --check, ruff check, mypy"
	@echo "make wheels medaudit-client and medaudit wheels + sdists into dist/ (make bento: a Bento of them)"
	@echo "make bench  benchmarks into benchmarks/results/"
	@echo "make load   locust mix against the served demo store -> benchmarks/results/load_cpu.md (LOAD_ARGS=...)"
	@echo "make soak   10 minutes of that mix, RSS growth after warm-up <= 10% -> benchmarks/results/soak_cpu.md"

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (torch 2.14.1 wheels are for CPython 3.11)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install whenever pyproject.toml changes (the stamp carries its hash).
$(STAMP): $(BIN)/python pyproject.toml clients/pyproject.toml
	$(BIN)/pip install --quiet -e ./clients -e '.[dev]'
	# The `medaudit` script is medaudit-client's; an older install of this project owned it, and
	# uninstalling that one during the upgrade removes it: put it back.
	test -x $(BIN)/medaudit || $(BIN)/pip install --quiet --no-deps --force-reinstall -e ./clients
	# zennit-crp is the reference for concept-conditioned heatmaps in the tests. Its metadata pins
	# zennit<=0.4.6, but the CondAttribution we compare against runs on 0.5.1 (method.md §11.2
	# pins 0.5.1), so it goes in without its dependency resolution.
	$(BIN)/pip install --quiet --no-deps zennit-crp==0.6.0
	# lxt is the reference for the ViT attention rules in the tests (lxt.explicit needs torch only).
	# Its metadata pulls transformers, accelerate, bitsandbytes and open_clip_torch, for its LLM
	# patches: it goes in without them. Test-only, never imported by models/ or service/.
	$(BIN)/pip install --quiet --no-deps lxt==2.1
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Wheels and sdists of both distributions (medaudit-client from clients/, medaudit) into dist/.
wheels: install
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist clients
	$(BIN)/python -m build --no-isolation --outdir dist .
	$(BIN)/twine check --strict dist/*

# A Bento of the service (bentofile.yaml), with the two wheels in its environment.
bento: wheels
	$(BIN)/bentoml build

# System packages the tests need (Redis, Chromium, Prometheus): one script, skipped when present.
system:
	bash scripts/setup-system.sh

demo: install
	$(BIN)/medaudit demo --out $(OUT)

train: install
	$(BIN)/medaudit train --out $(OUT)/resnet18-synthderm

test: install system
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install system
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	# mypy cannot follow setuptools' editable import hook, so it reads the packages through a tree of
	# links laid out as installed (medaudit/models -> models/, ...).
	rm -rf .cache/mypy-src && mkdir -p .cache/mypy-src/medaudit
	for d in models service cli clients testing; do ln -s ../../../$$d .cache/mypy-src/medaudit/$$d; done
	MYPYPATH=.cache/mypy-src $(BIN)/mypy -p medaudit.models -p medaudit.service -p medaudit.cli -p medaudit.clients -p medaudit.testing

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python benchmarks/data.py
	$(BIN)/python benchmarks/lrp.py
	$(BIN)/python benchmarks/finetune.py
	$(BIN)/python benchmarks/build.py

# The demo writes its example image last: its presence means the store is complete.
$(OUT)/example_malignant_band_aid.png: | install
	$(BIN)/medaudit demo --no-serve --out $(OUT)

load: install $(OUT)/example_malignant_band_aid.png
	$(BIN)/python benchmarks/load.py --home $(OUT)/bentoml $(LOAD_ARGS)

soak: install $(OUT)/example_malignant_band_aid.png
	$(BIN)/python benchmarks/load.py --home $(OUT)/bentoml --soak $(LOAD_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache .mypy_cache .ruff_cache
