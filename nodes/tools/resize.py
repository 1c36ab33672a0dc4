"""The rank tools: Resize cuts each layer of a TriLoRA to its strongest directions (the optimal
cut), Merge adds up to four TriLoRAs with weights (exactly, or cut to a rank)."""
from __future__ import annotations

from comfy_api.latest import io

from ...trilora_core import alias_groups, delta_energy, fold_aliases, merge_files, truncate, truncation_limits
from ..loras_folder import (
    NONE_FILE,
    OptionalLorasFileNode,
    check_names,
    file_choice,
    files_fingerprint,
    prefix_location,
)
from ..schema import (
    EXACT_DTYPE,
    dtype_input,
    energy_input,
    filename_output,
    info_output,
    max_rank_input,
    optional_trilora_input,
    prefix_input,
    trilora_output,
)
from .common import (
    alias_text,
    carried_metadata,
    rank_text,
    read_source,
    save_tool_output,
    share_text,
    tool_args,
    tool_schema,
)

MERGE_SLOTS = 4


class TriLoRAResize(OptionalLorasFileNode):
    @classmethod
    def define_schema(cls):
        return tool_schema(
            cls, "Resize TriLoRA (Rank / Energy)",
            description="Cuts each layer of a TriLoRA to its strongest directions and saves a smaller file: the "
                        "optimal cut (least error possible), as the loaders' max_rank / energy do at load time.",
            inputs=[
                file_choice("trilora_name", "The TriLoRA (or plain LoRA/LoCon, converted exactly) to resize, "
                            "from your loras folder. Ignored when the trilora input is connected.", none=True),
                prefix_input("trilora/resized"),
                max_rank_input("Keep at most this many directions per layer, the strongest ones. 0 = no limit.",
                               default=16),
                energy_input("Keep the fewest directions per layer that hold this share of the layer's energy "
                             "(sum of squared singular values). 1.0 = max_rank alone decides."),
                dtype_input("fp32", EXACT_DTYPE),
                optional_trilora_input("An in-memory TriLoRA to resize instead of a file."),
            ],
            outputs=[trilora_output(), filename_output(),
                     info_output("Ranks before and after, and the share of the energy kept.")],
        )

    @classmethod
    def execute(cls, trilora_name, filename_prefix, max_rank, energy, save_dtype, trilora=None):
        node = cls.__name__
        location = prefix_location(filename_prefix, node)
        label, source = read_source(node, trilora_name, trilora)
        layers = fold_aliases(source.layers)  # one weight, one cut: the optimal one for its whole delta
        cut = {p: truncate(layer, **truncation_limits(max_rank, energy)) for p, layer in layers.items()}
        energies = {p: delta_energy(layer) for p, layer in layers.items()}
        kept = {p: delta_energy(cut[p]) / e for p, e in energies.items() if e > 0}
        zero = len(energies) - len(kept)
        energy_text = f"energy kept {share_text(kept)}" if kept else "no layer holds any energy"
        if kept and zero:
            energy_text += f", over the {len(kept)} layers that hold any; {zero} all-zero layers"
        metadata = {**carried_metadata(source.metadata),
                    **tool_args("resize", source=label, max_rank=max_rank, energy=energy)}
        return save_tool_output(location, cut, metadata, save_dtype, lambda name, written: (
            f"resized {label}: {len(cut)} layers, {rank_text(layers)} -> {rank_text(written.layers)}; "
            f"{energy_text}; "
            f"saved as {name}{alias_text(alias_groups(source.layers))}"))


# --------------------------------------------------------------------------- merge


def _merge_inputs() -> list:
    inputs = []
    for i in range(1, MERGE_SLOTS + 1):
        inputs.append(file_choice(f"trilora_name_{i}", f"TriLoRA (or plain LoRA/LoCon) number {i} from your loras "
                                  f"folder; {NONE_FILE} leaves the slot empty. Ignored when trilora_{i} is "
                                  "connected.", none=True))
        inputs.append(io.Float.Input(id=f"weight_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                                     tooltip=f"Weight of TriLoRA {i} in the sum: 1.0 = as is, 0.5 = half, "
                                             "negative = subtracted."))
    return inputs


class TriLoRAMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return tool_schema(
            cls, "Merge TriLoRAs",
            description="Merges up to 4 TriLoRAs with weights into one canonical TriLoRA: exactly their "
                        "weighted sum when max_rank allows (0 = always), else its best approximation of that "
                        "rank. Layers are matched by name.",
            inputs=[
                prefix_input("trilora/merged"),
                *_merge_inputs(),
                max_rank_input("Rank limit per layer of the merged TriLoRA. 0 = no limit: the merge is exact "
                               "(each layer's rank is at most the sum of the inputs' ranks)."),
                energy_input("Keep the fewest directions per merged layer that hold this share of its energy. "
                             "1.0 = max_rank alone decides."),
                dtype_input("fp32", EXACT_DTYPE),
                *[optional_trilora_input(f"An in-memory TriLoRA for slot {i} instead of trilora_name_{i}.",
                                         input_id=f"trilora_{i}") for i in range(1, MERGE_SLOTS + 1)],
            ],
            outputs=[trilora_output(), filename_output(),
                     info_output("What was merged with which weights, and the merged ranks.")],
        )

    @classmethod
    def validate_inputs(cls, trilora_name_1=None, trilora_name_2=None, trilora_name_3=None, trilora_name_4=None):
        return check_names(trilora_name_1, trilora_name_2, trilora_name_3, trilora_name_4)

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return files_fingerprint(*(kwargs.get(f"trilora_name_{i}") for i in range(1, MERGE_SLOTS + 1)))

    @classmethod
    def execute(cls, filename_prefix, max_rank, energy, save_dtype, **slots):
        node = cls.__name__
        location = prefix_location(filename_prefix, node)
        sources, labels, weights, metas = [], [], [], []
        for i in range(1, MERGE_SLOTS + 1):
            name, memory = slots.get(f"trilora_name_{i}", NONE_FILE), slots.get(f"trilora_{i}")
            if memory is None and name in (None, "", NONE_FILE):
                continue
            label, adapter = read_source(node, name, memory, f"trilora_name_{i}", f"trilora_{i}")
            weight = float(slots.get(f"weight_{i}", 1.0))
            sources.append((adapter.layers, weight))
            labels.append(label)
            weights.append(weight)
            metas.append(carried_metadata(adapter.metadata))
        if not sources:
            raise ValueError(f"{node}: nothing to merge; choose files in trilora_name_1 to trilora_name_{MERGE_SLOTS} "
                             "or connect the trilora inputs")
        merged = merge_files(sources, **truncation_limits(max_rank, energy), names=labels)
        common = {k: v for k, v in metas[0].items() if all(m.get(k) == v for m in metas[1:])}  # e.g. base model
        common.pop("trilora_training_args", None)
        metadata = {**common, **tool_args("merge", sources=labels, weights=weights, max_rank=max_rank,
                                          energy=energy)}
        parts = ", ".join(f"{w:g} x {label}" for label, w in zip(labels, weights, strict=True))
        aliases = alias_groups({p: None for layers, _ in sources for p in layers})
        return save_tool_output(location, merged, metadata, save_dtype, lambda name, written: (
            f"merged {parts}: {len(merged)} layers, {rank_text(written.layers)}; saved as {name}"
            + alias_text(aliases, "added")))
