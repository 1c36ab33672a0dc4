"""The development host itself: the pack registers in the real ComfyUI, and the tiny
checkpoint loads, encodes, samples and decodes there."""
from __future__ import annotations

import subprocess
import sys

import torch
from conftest import COMFY, REPO, TINY

OUR_NODES = {"TriLoRALoader", "TriLoRALoaderModelOnly"}


def test_comfyui_loader_imports_the_pack_and_registers_its_nodes(comfy_host):
    assert comfy_host.loaded_ok, "ComfyUI's load_custom_node reported an import error for the pack"
    assert OUR_NODES <= set(comfy_host.nodes.NODE_CLASS_MAPPINGS)
    import comfy.weight_adapter as registry

    assert "trilora" in {a.name for a in registry.adapters}
    assert registry.adapter_maps["TriLoRA"].name == "trilora"


def test_node_schemas_have_tooltips_and_categories(comfy_host):
    for node_id in OUR_NODES:
        cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]
        info = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, spec in info.get(group, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert cls.CATEGORY == "loaders"
        assert all(cls.OUTPUT_TOOLTIPS), f"{node_id} has an output without a tooltip"
        assert "TriLoRA" in comfy_host.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]


def test_tiny_checkpoint_is_detected_as_sd15_and_samples(comfy_host, tiny):
    assert type(tiny.model.model.model_config).__name__ == "SD15"
    nodes = comfy_host.nodes
    positive = nodes.CLIPTextEncode().encode(tiny.clip, "a red cube")[0]
    negative = nodes.CLIPTextEncode().encode(tiny.clip, "")[0]
    assert torch.isfinite(positive[0][0]).all()
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    samples = nodes.KSampler().sample(tiny.model, 7, 3, 7.0, "euler", "normal", positive, negative, latent)[0]
    assert samples["samples"].shape == (1, 4, 8, 8)
    assert torch.isfinite(samples["samples"]).all()
    image = nodes.VAEDecode().decode(tiny.vae, samples)[0]
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_tiny_checkpoint_is_reproducible_from_its_seed(tmp_path):
    out = tmp_path / "again.safetensors"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_checkpoint.py"), "--output", str(out),
                    "--comfyui", str(COMFY)], check=True, capture_output=True)
    assert out.read_bytes() == (COMFY / "models" / "checkpoints" / TINY).read_bytes()


def test_trilora_core_imports_without_comfyui():
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import trilora_core; "
            "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules), 'comfy imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_schemas_hold_unique_ids_as_newer_comfyui_validates(comfy_host):
    """ComfyUI 0.2x rejects a schema whose input or output ids repeat; it assigns ids to id-less
    outputs in place, so an output object shared between two schemas carries one node's id into
    the other: every schema builds its own outputs."""
    pack = comfy_host.pack.__name__
    ours = [c for c in comfy_host.nodes.NODE_CLASS_MAPPINGS.values() if c.__module__.startswith(pack)]
    assert len(ours) >= len(OUR_NODES)
    seen_outputs = {}
    for cls in ours:
        schema = cls.GET_SCHEMA()
        inputs = [i.id for i in schema.inputs]
        outputs = [o.id or f"_{n}_{o.io_type}_" for n, o in enumerate(schema.outputs)]
        assert len(set(inputs)) == len(inputs), f"{schema.node_id} repeats an input id: {inputs}"
        assert len(set(outputs)) == len(outputs), f"{schema.node_id} repeats an output id: {outputs}"
        for o in schema.outputs:
            assert id(o) not in seen_outputs, f"{schema.node_id} shares an output object with {seen_outputs[id(o)]}"
            seen_outputs[id(o)] = schema.node_id
