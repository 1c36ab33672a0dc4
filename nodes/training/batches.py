"""The training data as the trainer uses it: the LATENT and CONDITIONING inputs split into one
latent per image and the conditioning entries each image trains with (checked, with errors that
name the input), and, per step, which images share a forward pass with which processed entries."""
from __future__ import annotations

import torch

from .family import conds_for_shape


def _is_conditioning(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], torch.Tensor) and isinstance(e[1], dict)
        for e in value)


def split_latents(latents) -> tuple[list[torch.Tensor], list[int]]:
    """([1, C, ...] per image], the LATENT input each came from) from one LATENT or a list."""
    if isinstance(latents, dict):
        latents = [latents]
    if not isinstance(latents, list) or not latents:
        raise ValueError("TrainTriLoRA: latents is empty; connect a LATENT (or a list of LATENTs) with at least one image")
    images, sources = [], []
    for n, latent in enumerate(latents):
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim < 4:
            raise ValueError(f"TrainTriLoRA: latents item {n + 1} is not a LATENT (no 'samples' tensor [batch, channels, ...])")
        finite = torch.isfinite(samples.detach()).flatten(1).all(1) if samples.numel() else samples.new_ones(0)
        if not bool(finite.all()):  # a failed VAE encode; training would only say "diverged"
            raise ValueError(f"TrainTriLoRA: latents item {n + 1}, image {int((~finite).nonzero()[0]) + 1} of "
                             f"{samples.shape[0]}, holds NaN or infinite values (a failed VAE encode gives them); "
                             "encode that image again or leave it out")
        for row in samples:
            images.append(row.unsqueeze(0))
            sources.append(n)
    if not images:
        raise ValueError("TrainTriLoRA: latents is empty; connect a LATENT (or a list of LATENTs) with at least one image")
    return images, sources


# Entry options with which ComfyUI's samplers apply a conditioning's entries together (areas,
# masks, strengths, timestep ranges, hooks): entries carrying one are never one caption per image.
_JOINT_KEYS = ("area", "mask", "strength", "start_percent", "end_percent", "clip_start_percent", "hooks")


def _one_entry_per_image(cond: list, batch_size: int) -> bool:
    """A LATENT batch's conditioning that holds one caption per image, in order: ComfyUI's
    ResolutionBucket (comfy_extras/nodes_dataset.py) outputs, per bucket, the stacked latents and
    the list of the images' own conditioning entries, so its length is the batch size."""
    return batch_size > 1 and len(cond) == batch_size and not any(k in extra for _, extra in cond for k in _JOINT_KEYS)


def _check_finite(conds: list) -> None:
    for n, cond in enumerate(conds):
        for e, (tensor, extra) in enumerate(cond):
            named = [("cond", tensor), *((k, v) for k, v in extra.items() if isinstance(v, torch.Tensor))]
            for what, value in named:
                if value.is_floating_point() and not bool(torch.isfinite(value.detach()).all()):
                    raise ValueError(f"TrainTriLoRA: positive item {n + 1}" + (f", entry {e + 1}" if len(cond) > 1
                                     else "") + f" holds NaN or infinite values in its {what} tensor; encode "
                                     "that prompt again")


def split_conditioning(positive, num_images: int, sources: list[int]) -> tuple[list, list[tuple[int, ...]]]:
    """(flat cond entries, entry indices per image) from the positive input: one CONDITIONING for
    all images, one per image, or one per LATENT input for all images of that batch, except that a
    batch's conditioning with one plain entry per image (ComfyUI's Resolution Bucket output)
    pairs entry i with image i. Raises ValueError naming the input when the counts do not fit."""
    conds = [positive] if _is_conditioning(positive) else positive
    if not isinstance(conds, list) or not conds or not all(_is_conditioning(c) for c in conds):
        raise ValueError("TrainTriLoRA: positive is empty or not a CONDITIONING; connect the output of a text encoder")
    _check_finite(conds)
    entries, per_cond = [], []
    for cond in conds:
        per_cond.append(tuple(range(len(entries), len(entries) + len(cond))))
        entries.extend(cond)
    num_batches = sources[-1] + 1
    if len(conds) == num_batches:
        image_conds = [per_cond[s] for s in sources]
        for batch, cond in enumerate(conds):
            images = [i for i, s in enumerate(sources) if s == batch]
            if _one_entry_per_image(cond, len(images)):
                for image, entry in zip(images, per_cond[batch], strict=True):
                    image_conds[image] = (entry,)
    elif len(conds) == 1:
        image_conds = [per_cond[0]] * num_images
    elif len(conds) == num_images:
        image_conds = per_cond
    else:
        raise ValueError(f"TrainTriLoRA: got {len(conds)} conditionings for {num_images} images "
                         f"(in {num_batches} LATENT input{'s' if num_batches > 1 else ''}); give one "
                         f"conditioning for all images, one per image, or one per LATENT input")
    return entries, image_conds


def clone_tree(value):
    """Tensors cloned outside inference mode (inputs made under it cannot be saved for backward)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone_tree(v) for v in value]
    if isinstance(value, tuple):
        return tuple(clone_tree(v) for v in value)
    return value


class ForwardBatches:
    """Which images of a step's batch share a forward pass, and the processed cond entries each
    pass takes. ComfyUI's guider processes the captions for the first latent's size
    (``start``); latents of other sizes get theirs computed once per size."""

    def __init__(self, images: list[torch.Tensor], image_conds: list[tuple[int, ...]], seed: int):
        self.images, self.image_conds, self.seed = images, image_conds, seed
        self.base, self.device = None, None
        self.processed: list = []  # the guider's processed cond entries, in input order
        self.by_shape: dict[tuple, list] = {}  # the same, for each latent shape

    def start(self, base, processed: list, images: list[torch.Tensor], device, processed_shape=None) -> None:
        """Once the guider has run: the BaseModel, its processed entries (made for the latent shape
        ``processed_shape``, default the first image's), the latents on the device."""
        self.base, self.processed, self.images, self.device = base, processed, images, device
        self.by_shape = {processed_shape or tuple(images[0].shape): processed}

    def processed_for(self, image: int) -> list:
        """The processed cond entries with their model inputs for this image's latent size."""
        shape = tuple(self.images[image].shape)
        if shape not in self.by_shape:
            self.by_shape[shape] = conds_for_shape(self.base, self.processed, shape, self.device, self.seed)
        return self.by_shape[shape]

    def conds_for(self, images: list[int]):
        """Cond entries for a forward of these images (of one shape), or None when they cannot share one."""
        processed = self.processed_for(images[0])
        keys = {self.image_conds[i] for i in images}
        if len(keys) == 1:  # one conditioning: ComfyUI repeats it over the batch
            return [processed[j] for j in next(iter(keys))]
        if any(len(k) != 1 for k in keys):
            return None
        return concat_entries([processed[self.image_conds[i][0]] for i in images])

    def groups(self, batch: list[int], share: list[int] | None = None) -> list[tuple[list[int], list]]:
        """[(positions in ``batch``, cond entries)] per forward pass of the positions ``share`` (this
        process's part of the batch; all by default): images of one shape together when their
        conditionings can be concatenated, else one pass each."""
        by_shape: dict[tuple, list[int]] = {}
        for pos in range(len(batch)) if share is None else share:
            image = batch[pos]
            by_shape.setdefault(tuple(self.images[image].shape), []).append(pos)
        groups = []
        for positions in by_shape.values():
            conds = self.conds_for([batch[p] for p in positions])
            if conds is not None:
                groups.append((positions, conds))
            else:
                groups.extend(([p], [self.processed_for(batch[p])[j] for j in self.image_conds[batch[p]]])
                              for p in positions)
        return groups


def concat_entries(entries: list[dict]) -> list | None:
    """One processed entry for a forward of several images, one entry each, as ComfyUI batches
    conditionings (CONDRegular.concat), or None when they differ in more than their model inputs."""
    first = entries[0]
    for other in entries[1:]:
        if other.keys() != first.keys() or other["model_conds"].keys() != first["model_conds"].keys():
            return None
        for key, value in first.items():
            if key not in ("model_conds", "uuid") and not _same(value, other[key]):
                return None
        for key, cond in first["model_conds"].items():
            if not (_batch_of_one(cond) and _batch_of_one(other["model_conds"][key])
                    and cond.can_concat(other["model_conds"][key])):
                return None
    merged = dict(first)
    merged["model_conds"] = {k: c._copy_with(c.concat([e["model_conds"][k] for e in entries[1:]]))
                             for k, c in first["model_conds"].items()}
    return [merged]


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def _batch_of_one(cond) -> bool:
    values = cond.cond if isinstance(cond.cond, list) else [cond.cond]
    return all(not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] == 1 for v in values)

