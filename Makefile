# Quick start: `make demo` trains and evaluates the built-in shapes detector; `make test` runs the
# tests. Both create or update .venv first (runtime requirements for the demo, plus the
# development requirements — torch, pytest — and the ONNX export requirements for the tests).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
EXPORT_STAMP := $(VENV)/.export-installed
DEMO_WORKDIR := workdirs/shapes
DEMO_OUT := outputs/shapes_demo
DEMO_IMAGES := $(addprefix .data/fcos_shapes/seed0_n1000-200_side256-320/validation/,000001.jpg 000002.jpg 000003.jpg 000004.jpg)

.PHONY: demo test lint venv

$(RUNTIME_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(DEV_STAMP): requirements-dev.txt $(RUNTIME_STAMP)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# jax2onnx's declared dependencies conflict with our orbax pin and are not what it imports:
# installed from the pinned list without resolution (requirements-export.txt says why).
$(EXPORT_STAMP): requirements-export.txt $(RUNTIME_STAMP)
	$(PY) -m pip install --quiet --no-deps -r requirements-export.txt
	touch $@

venv: $(DEV_STAMP) $(EXPORT_STAMP)

demo: $(RUNTIME_STAMP)
	$(PY) train.py --config configs/shapes.py --workdir $(DEMO_WORKDIR)
	@# predict never draws over an existing file: the demo's own folder is made anew each run.
	rm -rf $(DEMO_OUT)
	$(PY) -m fcos_jax.predict --config configs/shapes.py --checkpoint $(DEMO_WORKDIR) \
		--output $(DEMO_OUT)/detections.json --draw $(DEMO_OUT) $(DEMO_IMAGES)
	@echo "drawn detections: $(DEMO_OUT)/*.png"

# Two pytest workers, each taking whole files (module fixtures stay shared within a file): much of
# the suite is single-threaded tracing and subprocess start-up, which two workers overlap.
test: $(DEV_STAMP) $(EXPORT_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check fcos_jax configs tests benchmarks train.py eval.py
	$(VENV)/bin/ruff format --check fcos_jax configs tests benchmarks train.py eval.py
