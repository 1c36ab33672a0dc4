"""TriLoRASpectrum: each layer's singular values and cumulative energy as a picture, and how many
directions each part of the model uses (drawn by spectrum_plot.py)."""
from __future__ import annotations

from comfy_api.latest import io

from ...trilora_core import alias_groups, fold_aliases
from ..loras_folder import OptionalLorasFileNode, file_choice
from ..plot_style import to_comfy_image
from ..schema import optional_trilora_input
from . import spectrum_plot
from .common import alias_text, read_source, tool_schema


class TriLoRASpectrum(OptionalLorasFileNode):
    @classmethod
    def define_schema(cls):
        return tool_schema(
            cls, "TriLoRA Spectrum", output_node=False,
            description="Plots each layer's singular values and cumulative energy, and sums up how many "
                        "directions each part of the model uses (UNet input/middle/output blocks, text "
                        "encoder): a guide for max_rank / energy and for block weights.",
            inputs=[
                file_choice("trilora_name", "The TriLoRA (or plain LoRA/LoCon, converted exactly) to look at, "
                            "from your loras folder. Ignored when the trilora input is connected.", none=True),
                optional_trilora_input("An in-memory TriLoRA (e.g. from Train TriLoRA or Extract TriLoRA) to "
                                       "look at instead of a file."),
            ],
            outputs=[
                io.Image.Output(id="spectrum", display_name="spectrum",
                                tooltip="Top: each layer's singular values (log scale). Bottom: their cumulative "
                                        "share of the layer's energy, with 90% and 99% guides. One colour per "
                                        "model part."),
                io.String.Output(id="summary", display_name="summary",
                                 tooltip="Text summary per model part: layers, ranks, directions needed for 90% "
                                         "and 99% of the energy, and each part's share of the total energy."),
            ],
        )

    @classmethod
    def execute(cls, trilora_name, trilora=None):
        label, adapter = read_source(cls.__name__, trilora_name, trilora, keep_diffs=True)
        spectra = spectrum_plot.layer_spectra(fold_aliases(adapter.layers))  # one weight, one spectrum
        image = spectrum_plot.plot(spectra, f"TriLoRA spectrum: {label} ({len(spectra)} layers)")
        text = spectrum_plot.summary(spectra, label) + alias_text(alias_groups(adapter.layers))
        if adapter.diffs:
            text += (f"\n{len(adapter.diffs)} full-weight diffs (.diff/.diff_b) are not low-rank and not shown; "
                     "the loaders apply them as ComfyUI's LoraLoader does")
        return io.NodeOutput(to_comfy_image(image), text)
