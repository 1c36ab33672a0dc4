"""What each tensor key of an adapter file is: TriLoRA factor, LoRA factor, alpha, or part of
another adapter type (LoHa, LoKr, ...) that only ComfyUI's own loader handles."""

from __future__ import annotations

from dataclasses import dataclass

TRILORA_PARTS = ("trilora_u", "trilora_s", "trilora_vt")
ALPHA_PART = "alpha"


@dataclass(frozen=True)
class LoraNaming:
    """One file convention for the two LoRA factors; suffixes include their separator."""

    up: str
    down: str


LORA_NAMINGS = (
    LoraNaming(".lora_up.weight", ".lora_down.weight"),  # kohya / LyCORIS LoCon
    LoraNaming(".lora_B.weight", ".lora_A.weight"),  # PEFT / diffusers
    LoraNaming(".lora.up.weight", ".lora.down.weight"),  # older diffusers
    LoraNaming("_lora.up.weight", "_lora.down.weight"),  # diffusers attention processors
)
LORA_MID_SUFFIX = ".lora_mid.weight"  # LoCon Tucker

# Last key component -> adapter type, for the types ComfyUI loads but TriLoRA cannot convert.
_OTHER_ADAPTER_PREFIXES = (("hada_", "LoHa"), ("lokr_", "LoKr"), ("boft_", "BOFT"), ("oft_", "OFT"))
_OTHER_ADAPTER_NAMES = {
    "dora_scale": "DoRA",
    "diff": "full-weight diff",
    "diff_b": "full-weight diff",
    "set_weight": "full-weight diff",
    "w_norm": "full-weight diff",
    "b_norm": "full-weight diff",
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


def other_adapter_kind(key: str) -> str | None:
    """The adapter type ("LoHa", "LoKr", "OFT", ...) a key belongs to, if not LoRA/TriLoRA."""
    parts = key.split(".")
    last = parts[-1]
    for start, kind in _OTHER_ADAPTER_PREFIXES:
        if last.startswith(start):
            return kind
    if last in _OTHER_ADAPTER_NAMES:
        return _OTHER_ADAPTER_NAMES[last]
    if last == "weight" and len(parts) > 2 and parts[-2] in _GLORA_PARTS:
        return "GLoRA"
    return None
