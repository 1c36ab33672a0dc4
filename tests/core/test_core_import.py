from __future__ import annotations

import os
import subprocess
import sys

import trilora_core

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_import_does_not_pull_in_comfyui() -> None:
    code = (
        "import sys, trilora_core\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_extras', 'folder_paths', 'nodes'))\n"
        "assert 'comfy' not in sys.modules and not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_public_api() -> None:
    expected = {
        "TriLoRALayer",
        "canonicalize",
        "is_canonical",
        "truncate",
        "spectrum",
        "lora_to_trilora",
        "trilora_to_lora",
        "init_layer",
        "orthogonality_penalty",
        "lr_lambda",
        "prefix_for_weight",
        "weight_for_prefix",
        "prefixes_by_weight",
        "TriLoRAFileError",
        "TriLoRAFile",
        "write_trilora",
        "read_trilora",
        "read_adapter_file",
        "content_hash",
        "TRAINING_ARGS_KEY",
    }
    assert expected <= set(trilora_core.__all__)
    assert all(hasattr(trilora_core, name) for name in trilora_core.__all__)
    assert trilora_core.TRAINING_ARGS_KEY == "trilora_training_args"
