# edanb: every target creates .venv if needed and reuses it while requirements.txt is unchanged.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
REQ_HASH := $(shell sha256sum requirements.txt | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
# the demo's folders are fixed: experiments/demo.yaml names them
DEMO := data/demo
JOBS ?= 2

.PHONY: venv demo demo-null test test-fast lab bench export readme docs

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

demo: venv  ## the whole study on synthetic data: generate, preprocess (three caches), run experiments/demo.yaml and demo-questions.yaml, summarise (reruns reuse all)
	@start=$$(date +%s); set -e; \
	$(BIN)/edanb synth $(DEMO)/ubfc-synth --size 128 --quiet; \
	$(BIN)/edanb preprocess $(DEMO)/ubfc-synth --out $(DEMO)/cache --size 32 --landmarks --pulse --quiet | tail -n 1; \
	$(BIN)/edanb preprocess $(DEMO)/ubfc-synth --out $(DEMO)/cache-none --size 32 --crop none --quiet | tail -n 1; \
	$(BIN)/edanb preprocess $(DEMO)/ubfc-synth --out $(DEMO)/cache-none-8fps --size 32 --crop none --frame-hz 8 --quiet | tail -n 1; \
	status=0; $(BIN)/edanb run experiments/demo.yaml --results $(DEMO)/results --jobs $(JOBS) --quiet || status=$$?; \
	$(BIN)/edanb run experiments/demo-questions.yaml --results $(DEMO)/results --jobs $(JOBS) --quiet || status=$$?; \
	$(BIN)/edanb summary $(DEMO)/results; \
	echo "rendered: $(DEMO)/results/*/train.ipynb (one per run), $(DEMO)/results/summary.html"; \
	echo "make demo: $$(( $$(date +%s) - start )) s"; exit $$status

demo-null: venv  ## the demo grid again on null data (faces carry no EDA): every model should score r ~ 0; then the summary pairs each run with its null twin
	@start=$$(date +%s); set -e; \
	$(BIN)/edanb synth $(DEMO)/ubfc-null --size 128 --coupling 0 --quiet | tail -n 1; \
	$(BIN)/edanb preprocess $(DEMO)/ubfc-null --out $(DEMO)/cache-null --size 32 --landmarks --pulse --quiet | tail -n 1; \
	status=0; $(BIN)/edanb run experiments/demo.yaml --results $(DEMO)/results/null --jobs $(JOBS) --quiet \
		--set data=$(DEMO)/ubfc-null --set cache=$(DEMO)/cache-null || status=$$?; \
	$(BIN)/edanb summary $(DEMO)/results; \
	echo "make demo-null: $$(( $$(date +%s) - start )) s"; exit $$status

test: venv  ## everything: notebooks (nbdev_test, slow cells included) then pytest (all of it); what CI runs
	$(BIN)/nbdev_test --n_workers 2 --flags slow
	$(BIN)/python -m pytest -q tests

test-fast: venv  ## the developer loop (about 3 min): notebooks without `#| slow` cells beside pytest, one thread each, without slow, dask and torchrun tests
	@start=$$(date +%s); log=$$(mktemp); export OMP_NUM_THREADS=1; \
	$(BIN)/nbdev_test --n_workers 1 > $$log 2>&1 & notebooks=$$!; \
	$(BIN)/python -m pytest -q -m "not slow and not dask and not torchrun" tests; tests=$$?; \
	wait $$notebooks; nbs=$$?; grep -v "pkg_resources\|resource_filename" $$log | tail -n 25; rm -f $$log; \
	echo "make test-fast: $$(( $$(date +%s) - start )) s (notebooks: exit $$nbs, pytest: exit $$tests)"; \
	[ $$nbs -eq 0 ] && [ $$tests -eq 0 ]

lab: venv  ## JupyterLab on the notebooks
	$(BIN)/jupyter lab --notebook-dir=nbs $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

bench: venv  ## benchmarks (printed ratios, not timed tests); `make bench ONLY=models` runs one section
	$(BIN)/python bench/run.py $(ONLY)

export: venv  ## notebooks -> edanb/, then strip notebook outputs
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

readme: venv  ## README.md from nbs/index.ipynb
	$(BIN)/jupyter nbconvert --to markdown --stdout nbs/index.ipynb > README.md

docs: venv  ## offline HTML site (mkdocs.yml): notebooks (nbs/ executed), experiments, demo summary, API, search; EDANB_DOCS_EXECUTE=false: run nothing
	@start=$$(date +%s); set -e; \
	$(BIN)/mkdocs build --strict; \
	echo "open file://$(CURDIR)/_docs/site/index.html (works from disk, search included)"; \
	echo "make docs: $$(( $$(date +%s) - start )) s"
