"""TrainTriLoRA: fits a TriLoRA to a few images with the model's own denoising objective. The node
parses its inputs into TrainArgs (nodes/training/config.py, the one definition of each setting),
splits the data, runs nodes/training's trainer and applies the result to the MODEL output."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..trilora_core import TriLoRAFile, read_schedule
from .loras_folder import NONE_FILE, check_names, files_fingerprint
from .patching import apply_trilora
from .schema import LOSS_MAP, TRILORA
from .training import TrainArgs, find_targets, single_input, split_conditioning, split_latents, train


class TrainTriLoRA(io.ComfyNode):
    # Which layers train, (ModelPatcher, target_layers) -> [Target]; a subclass may choose others
    # (scripts/bench.py's one-layer baseline).
    select_targets = staticmethod(find_targets)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrainTriLoRA",
            display_name="Train TriLoRA",
            category="training",
            is_input_list=True,
            description="Trains a TriLoRA (U diag(s) Vt per layer) on a few images with the model's own denoising "
                        "objective. The result is applied to the MODEL output; save it with Save TriLoRA.",
            inputs=[
                io.Model.Input(id="model", tooltip="The diffusion model to train the TriLoRA for."),
                io.Latent.Input(id="latents", tooltip="The training images as latents: one LATENT batch, or a list "
                                "of LATENTs (sizes may differ, e.g. from Make Training Dataset)."),
                io.Conditioning.Input(id="positive", tooltip="The captions: one conditioning for all images, or a list "
                                      "with one per image (or one per LATENT batch). A batch's conditioning with "
                                      "one entry per image, as Resolution Bucket gives, pairs entry i with image i."),
                *TrainArgs.schema_inputs(),
                io.Latent.Input(id="validation_latents", optional=True, tooltip="Held-out images as latents (one "
                                "LATENT or a list), scored every validate_every steps and never trained on; also "
                                "see validation_split."),
                io.Conditioning.Input(id="validation_positive", optional=True, tooltip="The captions of "
                                      "validation_latents: one for all, one per image or one per LATENT."),
                io.Conditioning.Input(id="preservation", optional=True, tooltip="Prompts the TriLoRA should not "
                                      "change (e.g. CLIP Text Encode of \"\" and of the captions without the "
                                      "trigger word): base drift is measured on them. Default: the first caption "
                                      "zeroed out (ConditioningZeroOut)."),
                io.Clip.Input(id="clip", optional=True, tooltip="The CLIP that encoded positive (the "
                              "checkpoint's): with text_encoder_lr above 0 its text encoders train too, and with "
                              "text-encoder training, caption dropout or shuffle the captions are encoded with it "
                              "at every step."),
                io.String.Input(id="captions", optional=True, force_input=True, tooltip="The images' captions as "
                                "text, one per image in the images' order (Load Training Images' captions "
                                "output): what the CLIP encodes at every step. positive still gives each image's "
                                "conditioning options."),
                *TrainArgs.schema_inputs(text_encoder=True),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The input model with the trained TriLoRA applied "
                                "(strength 1)."),
                TRILORA.Output(display_name="TRILORA", tooltip="The trained TriLoRA with its training record; "
                               "save it with Save TriLoRA or preview it with Apply TriLoRA."),
                LOSS_MAP.Output(display_name="LOSS_MAP", tooltip="Loss per step of this run (for Plot Loss Graph), "
                                "and the held-out error and base drift at each evaluation (for TriLoRA Training "
                                "Curves)."),
                io.Int.Output(display_name="steps", tooltip="Total steps the TriLoRA has been trained for "
                              "(including a resumed file's)."),
                io.Clip.Output(display_name="CLIP", tooltip="The clip input with the trained text-encoder adapters "
                               "applied (strength 1); the clip input as it is when the text encoders did not "
                               "train."),
            ],
        )


    @classmethod
    def validate_inputs(cls, existing_lora=None):
        return check_names(single_input(existing_lora))

    @classmethod
    def fingerprint_inputs(cls, existing_lora=NONE_FILE, **_):
        return files_fingerprint(single_input(existing_lora))

    @classmethod
    def execute(cls, model, latents, positive, validation_latents=None, validation_positive=None, preservation=None,
                clip=None, captions=None, **settings):
        args = TrainArgs.from_inputs(settings)
        args.check()
        model = single_input(model)
        images, sources = split_latents(latents)
        entries, image_conds = split_conditioning(positive, len(images), sources)
        clip = single_input(clip)
        with torch.inference_mode(False), torch.enable_grad():
            trainer = train(args, model, images, entries, image_conds, select_targets=cls.select_targets,
                            clip=clip, captions=captions, validation_latents=validation_latents,
                            validation_positive=validation_positive, preservation=preservation)
            layers = trainer.layers()
            trilora = TriLoRAFile(layers, trainer.metadata(trainer.total))
        te_trained = args.text_encoder_lr > 0
        out_model, out_clip, _ = apply_trilora(model, clip if te_trained else None, layers, 1.0, 1.0, "TrainTriLoRA",
                                               schedule=read_schedule(trilora.metadata))
        loss_map = {"loss": list(trainer.losses), **trainer.monitor.curves()}
        return io.NodeOutput(out_model, trilora, loss_map, trainer.total, out_clip if te_trained else clip)


NODES = [TrainTriLoRA]
