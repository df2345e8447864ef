# edanb: every target creates .venv if needed and reuses it while requirements.txt is unchanged.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
DATA ?= data/ubfc-synth
CACHE ?= data/cache

.PHONY: venv demo test lab bench export readme

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -r requirements.txt
	@# face_recognition's metadata asks for dlib, which pip would build from source; dlib-bin (pinned) provides it
	$(BIN)/pip install --quiet --no-deps face_recognition==1.3.0
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: venv  ## generate the default synthetic dataset, check it, preprocess it (each step reused when unchanged)
	$(BIN)/edanb synth $(DATA)
	$(BIN)/edanb info $(DATA) | tail -n 4
	$(BIN)/edanb preprocess $(DATA) --out $(CACHE)

test: venv  ## notebooks (nbdev_test) then pytest
	$(BIN)/nbdev_test --n_workers 2
	$(BIN)/python -m pytest -q tests

lab: venv  ## JupyterLab on the notebooks
	$(BIN)/jupyter lab --notebook-dir=nbs $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

bench: venv  ## benchmarks (printed ratios, not timed tests); `make bench ONLY=models` runs one section
	$(BIN)/python bench/run.py $(ONLY)

export: venv  ## notebooks -> edanb/, then strip notebook outputs
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

readme: venv  ## README.md from nbs/index.ipynb
	$(BIN)/jupyter nbconvert --to markdown --stdout nbs/index.ipynb > README.md
