# make demo: the main job on the tiny model.  make test: the whole suite, as CI runs it.
# Both set everything up first (scripts/setup.sh), so a fresh clone needs nothing else.
PY := .venv/bin/python
# COMFYUI_DIR=/path uses an existing ComfyUI; by default setup builds one in .comfyui/.
COMFY := $(or $(COMFYUI_DIR),$(CURDIR)/.comfyui)
PORT ?= 8188

.PHONY: setup test test-core test-comfy test-e2e test-newest demo serve bench bench-gpu bench-method lint

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

# tests/comfy against another ComfyUI tree, such as the release users run today (CI keeps 0.3.75):
#   make test-newest COMFYUI_DIR=/path/to/ComfyUI NEWEST_PY=/path/to/its/venv/bin/python [TESTS=files] [PYTEST_ARGS=...]
# NEWEST_PY's environment holds that ComfyUI's requirements.txt (torchaudio included) and our
# requirements-dev.txt. The pack is linked into its custom_nodes/ as comfyui-trilora (an existing other
# copy there stops the run); the tiny checkpoint and the drawing model are built into its models
# folders as make setup builds them (minutes, once), the other fixtures on first use.
# Tests that cannot hold on that version are skipped by version, with the reason (pytest -rs).
test-newest:
	@[ -n "$(COMFYUI_DIR)" ] && [ -n "$(NEWEST_PY)" ] && [ -f "$(COMFYUI_DIR)/main.py" ] || { \
		echo "usage: make test-newest COMFYUI_DIR=/path/to/ComfyUI NEWEST_PY=/path/to/python"; exit 2; }
	@link="$(COMFYUI_DIR)/custom_nodes/comfyui-trilora"; \
	if [ ! -e "$$link" ]; then ln -s "$(CURDIR)" "$$link"; \
	elif [ "$$(readlink -f "$$link")" != "$$(readlink -f "$(CURDIR)")" ]; then \
		echo "$$link is another copy of the pack: move it away or link it to $(CURDIR)"; exit 2; fi
	"$(NEWEST_PY)" scripts/make_tiny_checkpoint.py --comfyui "$(COMFYUI_DIR)" --drawing
	COMFYUI_DIR="$(COMFYUI_DIR)" "$(NEWEST_PY)" -m pytest $(or $(TESTS),tests/comfy) -rs $(PYTEST_ARGS)

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
