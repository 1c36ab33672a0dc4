"""TriLoRATrainingCurves: Train TriLoRA's LOSS_MAP as one picture (training loss, held-out error,
base drift, the kept step) and a table (drawn by nodes/curves_plot.py)."""
from __future__ import annotations

from comfy_api.latest import io

from . import curves_plot
from .plot_style import to_comfy_image
from .schema import LOSS_MAP


class TriLoRATrainingCurves(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TriLoRATrainingCurves",
            display_name="TriLoRA Training Curves",
            category="training",
            description="Plots a Train TriLoRA run: the training loss per step, the held-out error and the base "
                        "drift at each evaluation, and the step keep_best kept.",
            inputs=[LOSS_MAP.Input(id="loss_map", tooltip="The LOSS_MAP output of Train TriLoRA.")],
            outputs=[
                io.Image.Output(display_name="curves", tooltip="Top: training loss and held-out error (log "
                                "scale). Bottom: base drift. A dashed line marks the kept step."),
                io.String.Output(display_name="table", tooltip="Held-out error (objective and x0) and drift at "
                                 "each evaluation, and the kept step."),
            ],
        )

    @classmethod
    def execute(cls, loss_map):
        if not isinstance(loss_map, dict) or not isinstance(loss_map.get("loss"), list):
            raise ValueError("TriLoRATrainingCurves: loss_map is not a LOSS_MAP (a dict with a 'loss' list); "
                             "connect Train TriLoRA's LOSS_MAP output")
        image = curves_plot.plot(loss_map, f"Train TriLoRA: {len(loss_map['loss'])} steps")
        return io.NodeOutput(to_comfy_image(image), curves_plot.summary(loss_map))


NODES = [TriLoRATrainingCurves]
