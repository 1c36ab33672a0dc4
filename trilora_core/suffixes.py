"""What each tensor key of an adapter file is: TriLoRA factor, LoRA factor, alpha, a full-weight
diff ComfyUI adds to a weight or bias, or part of another adapter type (LoHa, LoKr, ...) that only
ComfyUI's own loader handles. The LoRA namings are the ones ComfyUI's LoRA adapter reads
(comfy/weight_adapter/lora.py)."""

from __future__ import annotations

from dataclasses import dataclass

TRILORA_PARTS = ("trilora_u", "trilora_s", "trilora_vt")
ALPHA_PART = "alpha"
# Full-weight diffs ComfyUI's TrainLoraNode writes next to its LoRA factors: P.diff for a weight
# it trains whole (norms), P.diff_b for a bias. ComfyUI adds them to the weight / bias as they are.
DIFF_PARTS = ("diff", "diff_b")


@dataclass(frozen=True)
class LoraNaming:
    """One file convention for the two LoRA factors; suffixes include their separator."""

    up: str
    down: str


LORA_NAMINGS = (
    LoraNaming(".lora_up.weight", ".lora_down.weight"),  # kohya, LyCORIS LoCon, ComfyUI TrainLoraNode
    LoraNaming(".lora_B.weight", ".lora_A.weight"),  # PEFT / diffusers, ai-toolkit, musubi-tuner
    LoraNaming(".lora.up.weight", ".lora.down.weight"),  # older diffusers
    LoraNaming("_lora.up.weight", "_lora.down.weight"),  # diffusers attention processors (to_q_lora)
    LoraNaming(".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),  # diffusers text encoders
    LoraNaming(".lora_B.default.weight", ".lora_A.default.weight"),  # PEFT with its adapter name (Qwen)
    LoraNaming(".lora_B", ".lora_A"),  # Mochi
)
LORA_MID_SUFFIX = ".lora_mid.weight"  # LoCon Tucker

# Key component -> adapter type, for the types TriLoRA cannot convert exactly.
_OTHER_ADAPTER_PREFIXES = (("hada_", "LoHa"), ("lokr_", "LoKr"), ("boft_", "BOFT"), ("oft_", "OFT/BOFT"))
_OTHER_ADAPTER_NAMES = {
    "dora_scale": "DoRA (LyCORIS dora_scale)",
    "lora_magnitude_vector": "DoRA (PEFT lora_magnitude_vector)",
    "rescale": "OFT/BOFT",
    "ia3_l": "IA3",
    "on_input": "IA3",
    "set_weight": "full-weight (set_weight)",
    "w_norm": "full-weight norm diff (w_norm)",
    "b_norm": "full-weight norm diff (b_norm)",
    "reshape_weight": "Flux control (reshape_weight)",
}
_GLORA_PARTS = ("a1", "a2", "b1", "b2")


def split_trilora_key(key: str) -> tuple[str, str] | None:
    """(prefix, part) for ``P.trilora_u|trilora_s|trilora_vt|alpha``, else None."""
    prefix, dot, part = key.rpartition(".")
    if dot and prefix and (part in TRILORA_PARTS or part == ALPHA_PART):
        return prefix, part
    return None


def split_lora_key(key: str) -> tuple[str, LoraNaming, str] | None:
    """(prefix, naming, "up" | "down") for a LoRA factor key, else None."""
    for naming in LORA_NAMINGS:
        for side, suffix in (("up", naming.up), ("down", naming.down)):
            if key.endswith(suffix) and len(key) > len(suffix):
                return key[: -len(suffix)], naming, side
    return None


def split_diff_key(key: str) -> tuple[str, str] | None:
    """(prefix, "diff" | "diff_b") for a full-weight diff key, else None."""
    prefix, dot, part = key.rpartition(".")
    if dot and prefix and part in DIFF_PARTS:
        return prefix, part
    return None


def other_adapter_kind(key: str) -> str | None:
    """The adapter type ("LoHa", "LoKr", "DoRA ...", ...) a key belongs to, if it is not part of
    a LoRA, a TriLoRA or a diff. PEFT keeps the adapter's parameter name before ``.weight`` or
    ``.default``, so every component is looked at, not only the last."""
    parts = key.split(".")
    for part in reversed(parts[1:]):
        for start, kind in _OTHER_ADAPTER_PREFIXES:
            if part.startswith(start):
                return kind
        if part in _OTHER_ADAPTER_NAMES:
            return _OTHER_ADAPTER_NAMES[part]
    if parts[-1] == "weight" and len(parts) > 2 and parts[-2] in _GLORA_PARTS:
        return "GLoRA"
    return None


# Prefix families that name one part of the model in different trainers' conventions: kohya
# (lora_unet_/lora_te_), SimpleTuner (lycoris_), OneTrainer (lora_transformer_), diffusers/PEFT
# (unet./transformer./text_encoder.), ComfyUI (diffusion_model.). Longest first.
_PART_PREFIXES = (
    ("lora_transformer_", "unet"), ("diffusion_model.", "unet"), ("base_model.model.", "unet"),
    ("transformer.", "unet"), ("lora_unet_", "unet"), ("lycoris_", "unet"), ("unet.", "unet"),
    ("text_encoder_2.", "te2"), ("text_encoder.", "te"), ("lora_te1_", "te1"), ("lora_te2_", "te2"),
    ("lora_te3_", "te3"), ("lora_te_", "te"),
)


def alias_key(prefix: str) -> str:
    """A model-free name for the weight a file prefix adapts: prefixes of one weight in different
    conventions that differ only in their family prefix, ``.``/``_`` and diffusers' ``processor.``
    get the same key (``unet.down_blocks.0.attentions.0.proj_in`` and
    ``lora_unet_down_blocks_0_attentions_0_proj_in``). Names that need the model's own map
    (``lora_unet_input_blocks_1_1_...`` for the same weight) are told apart only with a key map
    (keys.layers_by_weight). Unknown families are returned as they are."""
    for start, part in _PART_PREFIXES:
        if prefix.startswith(start):
            flat = prefix[len(start):].replace(".processor.", ".").replace(".", "_")
            return f"{part}:{flat.removesuffix('_0') if flat.endswith('_to_out_0') else flat}"
    return prefix
