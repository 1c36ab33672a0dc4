# make demo: the main job on the tiny model.  make test: the whole suite, as CI runs it.
# Both set everything up first (scripts/setup.sh), so a fresh clone needs nothing else.
PY := .venv/bin/python
# COMFYUI_DIR=/path uses an existing ComfyUI; by default setup builds one in .comfyui/.
COMFY := $(or $(COMFYUI_DIR),$(CURDIR)/.comfyui)
PORT ?= 8188

.PHONY: setup test test-core test-comfy test-e2e demo serve bench bench-gpu bench-method lint

setup:
	@bash scripts/setup.sh

# ruff first: a style or complexity finding fails the run before minutes of tests.
test: setup lint
	$(PY) -m pytest tests/core
	$(PY) -m pytest tests/comfy
	$(PY) -m pytest tests/e2e

test-core: setup
	$(PY) -m pytest tests/core

test-comfy: setup
	$(PY) -m pytest tests/comfy

test-e2e: setup
	$(PY) -m pytest tests/e2e

demo: setup
	$(PY) scripts/demo.py $(if $(CKPT),--ckpt "$(CKPT)")

serve: setup
	cd "$(COMFY)" && $(CURDIR)/$(PY) main.py --listen 127.0.0.1 --port $(PORT) \
		$(if $(shell $(PY) -c "import torch; print(torch.cuda.is_available() or '')"),,--cpu)

bench: setup
	$(PY) scripts/bench.py
	$(PY) scripts/bench_distributed.py
	$(PY) scripts/bench_monitor.py

# One CUDA GPU, < 8 min: full-size SD1.5 / SDXL / Flux rows and the CUDA checks (see the script).
bench-gpu: setup
	$(PY) scripts/bench_gpu.py

# TriLoRA against ComfyUI's LoRA on a pretrained tiny model: fit, overfitting, drift (BENCHMARKS.md)
bench-method: setup
	$(PY) scripts/bench_method.py

lint: setup
	$(PY) -m ruff check .
