# The two commands of the README:  `make cifar10`  (set-up + main job)  and  `make test`  (set-up + tests).
# Both create .venv and install edgesmith into it on first use, and seed Keras's weight cache.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SHARED ?= ../shared
DATA ?= $(SHARED)/data/cifar10
OUT ?= runs/cifar10

.PHONY: setup keras-cache test cifar10 quickstart

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Keras (tf_keras) looks for downloaded weights in ~/.keras/models; it ignores KERAS_HOME.
keras-cache:
	@mkdir -p $(HOME)/.keras/models
	@if [ -d $(SHARED)/keras-cache/models ]; then cp -n $(SHARED)/keras-cache/models/* $(HOME)/.keras/models/; \
	else echo "note: $(SHARED)/keras-cache/models not found; ImageNet weights will be downloaded if a network exists"; fi

test: setup keras-cache
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

cifar10: setup keras-cache
	$(BIN)/edgesmith run recipes/cifar10.toml --data $(DATA) --out $(OUT) --force

quickstart: setup
	$(BIN)/edgesmith run quickstart --out runs/quickstart --force
