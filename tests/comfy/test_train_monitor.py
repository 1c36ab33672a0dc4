"""TrainTriLoRA's evaluations in the real ComfyUI on the tiny SD1.5 model (CPU): held-out error and
base drift against an offline computation of the same quantities, keep_best, early stop, the
curves in LOSS_MAP and the file, and bad inputs caught before step 1."""
from __future__ import annotations

import importlib
import json

import comfy.samplers
import comfy.utils
import pytest
import torch
from comfy_extras.nodes_custom_sampler import Guider_Basic
from test_train import FASTEST_FIT, load_data, run, train


@pytest.fixture(scope="module")
def data(comfy_host):
    return load_data(comfy_host)


class _FixedLevels(comfy.samplers.Sampler):
    """(objective error, x0 error) of one latent at the fixed validation levels and noise, one level
    per forward: the offline yardstick the trainer's batched evaluation must equal."""

    def __init__(self, core, x0, purpose, item, out):
        self.core, self.x0, self.purpose, self.item, self.out = core, x0, purpose, item, out

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        for n, t in enumerate(self.core.validation_levels()):
            sigma = torch.tensor([float(ms.percent_to_sigma(1.0 - t))])
            eps = self.core.validation_noise(self.x0.shape, self.purpose, self.item, n)
            denoised = model_wrap(ms.noise_scaling(sigma, eps, self.x0, False), sigma, **extra_args)
            coeff = ms.calculate_denoised(sigma, torch.ones_like(denoised), torch.zeros_like(denoised))
            self.out.append((denoised.float(), coeff))
        return torch.zeros_like(latent_image)


def predictions(core, model, x0, cond, purpose, item):
    out = []
    with torch.inference_mode():
        x0 = model.model.process_latent_in(x0)
        guider = Guider_Basic(model)
        guider.set_conds(cond)
        guider.sample(torch.zeros_like(x0), x0, _FixedLevels(core, x0, purpose, item, out), torch.tensor([1.0, 0.0]))
    return x0, out


def heldout_error(core, model, x0, cond, item):
    x0, out = predictions(core, model, x0, cond, "heldout", item)
    errs = [core.prediction_errors(d, x0, c) for d, c in out]
    return sum(float(e[0]) for e in errs) / len(errs), sum(float(e[1]) for e in errs) / len(errs)


def zeroed(cond):
    return [[torch.zeros_like(c), {**e, "pooled_output": torch.zeros_like(e["pooled_output"])}
             if isinstance(e.get("pooled_output"), torch.Tensor) else dict(e)] for c, e in cond]


def test_split_is_seeded_disjoint_and_curves_equal_an_offline_computation(comfy_host, data):
    core = comfy_host.core
    keep, held = core.holdout_split(4, 0.25, 3)
    assert len(held) == 1 and sorted(keep + held) == [0, 1, 2, 3]
    model, trilora, loss_map, steps = train(comfy_host, data, steps=2, seed=3, validation_split=0.25,
                                            validate_every=1, **FASTEST_FIT)
    assert steps == 2 and len(loss_map["loss"]) == 2
    assert loss_map["eval_steps"] == [0, 1, 2] and loss_map["best_step"] is None
    i = held[0]
    sample = {"samples": data.latent["samples"][i: i + 1]}["samples"]
    # Step 0: the adapter is zero, so the held-out error is the base model's and the drift is 0.
    assert (loss_map["heldout"][0], loss_map["heldout_x0"][0]) == pytest.approx(
        heldout_error(core, data.model, sample, data.conds[i], 0), rel=1e-5)
    assert loss_map["drift"][0] == 0.0 and loss_map["drift_x0"][0] == 0.0
    # The last step: the output model (the adapter patched into the weights) scored offline.
    last = heldout_error(core, model, sample, data.conds[i], 0)
    assert (loss_map["heldout"][-1], loss_map["heldout_x0"][-1]) == pytest.approx(last, rel=1e-4)
    assert loss_map["heldout"][-1] != loss_map["heldout"][0]
    # Drift: the first training image under the zeroed first caption, against the base.
    first = keep[0]
    x0, base = predictions(core, data.model, data.latent["samples"][first: first + 1], zeroed(data.conds[first]),
                           "drift", 0)
    _, now = predictions(core, model, data.latent["samples"][first: first + 1], zeroed(data.conds[first]), "drift", 0)
    drift = [core.prediction_drift(d, b, c) for (d, c), (b, _) in zip(now, base, strict=True)]
    assert loss_map["drift"][-1] == pytest.approx(sum(float(d[0]) for d in drift) / len(drift), rel=1e-3)
    assert loss_map["drift"][-1] > 0
    # The file carries the curves.
    curves = json.loads(trilora.metadata["trilora_curves"])
    assert curves["eval_steps"] == [0, 1, 2]
    assert curves["heldout"] == pytest.approx(loss_map["heldout"], rel=1e-5)
    # The same seed holds out the same image and gives the same curves; another seed another image.
    again = train(comfy_host, data, steps=1, seed=3, validation_split=0.25, validate_every=1, **FASTEST_FIT)[2]
    assert again["heldout"][:2] == loss_map["heldout"][:2]
    assert any(core.holdout_split(4, 0.25, s)[1] != held for s in range(4, 10))


def test_validation_inputs_and_preservation_prompts(comfy_host, data):
    core = comfy_host.core
    val = {"samples": data.latent["samples"][3:4]}
    loss_map = train(comfy_host, data, steps=1, validate_every=1, latents=[{"samples": data.latent["samples"][:3]}],
                     positive=data.conds[:3], validation_latents=[val], validation_positive=[data.conds[3]],
                     preservation=[data.conds[0]], **FASTEST_FIT)[2]
    assert loss_map["heldout"][0] == pytest.approx(
        heldout_error(core, data.model, val["samples"], data.conds[3], 0)[0], rel=1e-5)
    assert len(loss_map["drift"]) == 2 and loss_map["drift"][1] > 0


def test_keep_best_returns_exactly_the_adapter_of_the_chosen_step(comfy_host, data):
    settings = dict(steps=4, seed=1, validation_split=0.25, validate_every=1, learning_rate=0.003,
                    target_layers="all linear+conv", s_learning_rate_scale=1.0)
    _, trilora, loss_map, steps = train(comfy_host, data, keep_best="held-out", **settings)
    heldout = loss_map["heldout"]
    best = loss_map["eval_steps"][heldout.index(min(heldout))]
    assert loss_map["best_step"] == best == steps and len(loss_map["loss"]) == 4
    assert json.loads(trilora.metadata["trilora_steps"]) == best
    assert 0 < best < 4  # this run's held-out error is lowest mid-run (it overshoots at this learning rate)
    plain = train(comfy_host, data, **{**settings, "steps": best})[1]  # the same run, stopped there
    assert plain.layers.keys() == trilora.layers.keys()
    for name, layer in plain.layers.items():
        theirs = trilora.layers[name]
        assert torch.equal(layer.s, theirs.s) and torch.equal(layer.u, theirs.u) and torch.equal(layer.vt, theirs.vt)
    # A drift bound only the untrained adapter meets keeps step 0 (s = 0); one evaluation without a
    # better step then stops the run.
    _, trilora, loss_map, steps = train(comfy_host, data, keep_best="drift-bounded held-out", max_drift=1e-12,
                                        early_stop_evaluations=1, **settings)
    assert steps == 0 and loss_map["best_step"] == 0 and len(loss_map["loss"]) == 1
    assert all(float(layer.s.abs().max()) == 0.0 for layer in trilora.layers.values())


def test_plot_loss_graph_and_training_curves_read_the_loss_map(comfy_host, data):
    loss_map = train(comfy_host, data, steps=2, validation_split=0.25, validate_every=1, keep_best="held-out")[2]
    with torch.inference_mode():
        comfy_host.nodes.NODE_CLASS_MAPPINGS["LossGraphNode"].execute(loss=loss_map, filename_prefix="monitor/loss")
    image = run(comfy_host, "TriLoRATrainingCurves", loss_map=loss_map)[0]
    assert image.ndim == 4 and image.shape[-1] == 3 and float(image.std()) > 0
    # At the node's defaults: drift only (no held-out images), one evaluation before and one after.
    plain = train(comfy_host, data, steps=2)[2]
    assert plain["eval_steps"] == [0, 2] and "heldout" not in plain and plain["best_step"] is None
    image, table = run(comfy_host, "TriLoRATrainingCurves", loss_map=plain)
    assert float(image.std()) > 0 and table.splitlines()[0] == "step  drift  drift_x0"
    # Evaluations off: the loss alone.
    bare = train(comfy_host, data, steps=2, validate_every=0)[2]
    assert bare["eval_steps"] == [] and float(run(comfy_host, "TriLoRATrainingCurves", loss_map=bare)[0].std()) > 0


@pytest.mark.parametrize("inputs, message", [
    ({"validation_split": 0.9}, "leaves none to train on"),
    ({"validation_latents": [{"samples": torch.zeros(1, 3, 8, 8)}]}, "3 channels"),
    ({"keep_best": "held-out"}, "needs held-out images"),
    ({"early_stop_evaluations": 2}, "early_stop_evaluations"),
    ({"validation_split": 0.25, "keep_best": "held-out", "validate_every": 0}, "validate_every is 0"),
])
def test_bad_monitor_inputs_are_clear_errors_before_step_1(comfy_host, data, inputs, message):
    if "validation_latents" in inputs:
        inputs["validation_positive"] = [data.conds[0]]
    with pytest.raises(ValueError, match=message):
        train(comfy_host, data, steps=1, **inputs)


def test_previews_reach_the_progress_bar_every_preview_every_steps(comfy_host, data):
    seen = []

    def hook(value, total, preview, node_id=None):
        if preview is not None:
            seen.append((value, total, preview))

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        train(comfy_host, data, steps=4, preview_every=2, validate_every=0, **FASTEST_FIT)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert [(v, t) for v, t, _ in seen] == [(2, 4), (4, 4)]
    kinds, images = {p[0] for _, _, p in seen}, [p[1] for _, _, p in seen]
    assert kinds == {"JPEG"} and images[0].size == (8, 8)  # Latent2RGB: one pixel per latent pixel
    assert images[0].tobytes() != images[1].tobytes()  # the adapter moved between them


def test_run_log_writes_jsonl_previews_and_tensorboard_events(comfy_host, tmp_path):
    # The command line's log (nodes/run_log.py), read back with TensorBoard's own reader.
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_log = importlib.import_module(f"{comfy_host.pack.__name__}.nodes.run_log")  # the CLI's, not loaded by ComfyUI
    log = run_log.RunLog(str(tmp_path), decode=lambda latent: Image.new(
        "RGB", (8 * latent.shape[-1], 8 * latent.shape[-2])))
    log(1, {"loss": 0.5})
    log(2, {"loss": 0.25})
    log(2, {"heldout": 0.3, "drift": 0.01})
    log(2, {"preview": torch.zeros(1, 4, 2, 3)})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}, {"step": 2, "heldout": 0.3, "drift": 0.01},
                    {"step": 2, "preview": "preview_step000002.png"}]
    with Image.open(tmp_path / "preview_step000002.png") as picture:
        assert picture.size == (24, 16)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.25)]
    assert events.Scalars("eval/heldout")[0].value == pytest.approx(0.3)
    assert events.Scalars("eval/drift")[0].value == pytest.approx(0.01)


def test_out_of_memory_while_measuring_ends_the_run_with_the_adapter_saved(comfy_host, data, monkeypatch):
    # A fault injected where an evaluation allocates (the real out-of-memory path of a step is
    # tests/comfy/test_out_of_memory.py): after step 2 the evaluation fails as the allocator would.
    from harness.host import pack_module

    monitor = pack_module(comfy_host, "nodes.training.monitor").Monitor
    evaluate = monitor.evaluate

    def failing(self, trainer, model_wrap, extra_args, steps_done):
        if steps_done == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return evaluate(self, trainer, model_wrap, extra_args, steps_done)

    monkeypatch.setattr(monitor, "evaluate", failing)
    with pytest.raises(Exception, match=r"out of memory at step 3 of 4 .*measuring after step 2") as caught:
        train(comfy_host, data, steps=4, validate_every=2, checkpoint_prefix="measuring/run", **FASTEST_FIT)
    assert type(caught.value).__name__ == "TrainingOutOfMemoryError"
    saved = sorted((comfy_host.loras / "measuring").glob("*_last_good.safetensors"))
    assert len(saved) == 1 and "step000002" in saved[0].name
    assert comfy_host.core.read_trilora(saved[0]).metadata["trilora_steps"] == "2"
