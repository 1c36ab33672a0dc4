"""A tiny SD1.5 checkpoint that draws, for `make demo` (issue 16), and the statistics that measure it.

The random test fixture (scripts/make_tiny_checkpoint.py) proves plumbing; its pictures are noise.
This module gives the same checkpoint layout (ComfyUI detects it as SD1.5: the UNet keeps SD1.5's
widths, CLIP-L stays the fixture's random one) weights that draw:

- **VAE** (TAESD-shaped): the encoder is set by hand: it averages each 8 x 8 cell into RGB
  (three latent channels) and a luminance average shifted by half a cell (the fourth), the one
  linear map TAESD's convs and ReLUs can hold exactly (pixels are non-negative, so every
  unused block is the identity). The decoder is a 32-channel network trained for seconds on flat
  pictures and placed in the first 32 of TAESD's 64 channels (the others stay zero): it puts
  edges where the cell averages say they are, and thin frames at the picture's border.
- **UNet**: pretrained from a fixed seed on procedural captioned pictures that are *not* the demo's
  sample style: two flat shapes on a plain background, no frame, in the sample set's layout and
  vocabulary. Training SD1.5's 320-channel UNet on two CPU cores for minutes teaches it little,
  so a 64-channel UNet of the same layout (ComfyUI's own UNetModel) is trained and then embedded
  exactly into the 320-channel one: each small channel becomes one channel of a GroupNorm group
  (the other channels are zero and stay zero), and the small model's norms count those zeros, so
  the big model computes the same function (`embed_unet`, checked by `tests/comfy/test_drawing.py`).
- **Statistics** on generated pictures: `frame_contrast` (the sample style's thick black frame)
  and `colour_distance` (the caption's large shape keeps its colour).

Measured (issue 16): the VAE keeps the sample pictures at PSNR 21.9-23.6 dB at 128 px and the
embedding is exact; the whole build (decoder 150 steps, UNet 320 steps) took 211 s on 2 CPU cores
with a test suite beside it. `make setup` builds it once. The UNet draws the caption's shapes
and colours as soft blobs on the caption's background, without a frame; `make demo` trains the
sample style on it and the frame appears with the strength.

ComfyUI must be imported (on the CPU) before the functions here run. Everything is seeded: the
same seed gives the same bytes (torch on one thread per op order; see `build`).
"""
from __future__ import annotations

import functools
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import make_sample_images as style  # noqa: E402  (the sample style's vocabulary and shapes)

SIZE = 128                 # picture side in pixels (16 x 16 latents)
LATENT = SIZE // 8
SEED = 20261130
# SD1.5 multiplies latents by 0.18215 (its latent format); the encoder's output lies in [-1, 1],
# so dividing it by half that makes the UNet's inputs span [-2, 2], about SD1.5's own spread.
VAE_SCALE = 0.18215 / 2
DECODER_WIDTH = 32
UNET_WIDTH = 64
FULL_WIDTH = 320           # SD1.5's model_channels: what ComfyUI's detection reads
# Unconditional pictures (caption dropout) use these captions, so classifier-free guidance
# against an empty or a generic negative prompt (the workflows') has something to push from.
UNCONDITIONAL = ("", "photo, realistic, blurry, text, watermark")
DROPOUT = 0.15
# The base never sees the style: no trigger word, no frame.
BASE_COLOURS = [c for c in style.COLOURS if c != "black"]


# =========================================================================== pictures


def base_caption(big: str, big_shape: str, small: str, small_shape: str, background: str) -> str:
    return (f"flat geometric illustration of a large {big} {big_shape} and a small {small} {small_shape} "
            f"on a {background} background")


@functools.cache
def caption_pool(count: int = 32) -> tuple[tuple[str, str, str, str, str], ...]:
    """`count` (big colour, big shape, small colour, small shape, background) combinations from a
    fixed seed; the first is the workflows' own prompt less the style (red circle, blue square, cream)."""
    rng = random.Random(SEED)
    pool = [("red", "circle", "blue", "square", "cream")]
    while len(pool) < count:
        big, small = rng.sample(BASE_COLOURS, 2)
        combo = (big, rng.choice(style.SHAPES), small, rng.choice(style.SHAPES), rng.choice(list(style.BACKGROUNDS)))
        if combo not in pool:
            pool.append(combo)
    return tuple(pool)


def base_picture(combo: tuple[str, str, str, str, str], jitter: int, size: int = SIZE) -> Image.Image:
    """Two flat shapes on a plain background, placed as in the sample style (large one upper left,
    small one lower right, moved by up to 20/512 of the side from a seed), with no frame. Drawn at
    512 px and resized with Lanczos, as the sample images reach the trainer."""
    big, big_shape, small, small_shape, background = combo
    rng = random.Random(SEED * 31 + jitter)
    side = style.SIZE
    image = Image.new("RGB", (side, side), style.BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    centres = [(side * 3 // 8 + rng.randrange(-20, 21), side * 3 // 8 + rng.randrange(-20, 21)),
               (side * 11 // 16 + rng.randrange(-20, 21), side * 11 // 16 + rng.randrange(-20, 21))]
    for (cx, cy), r, shape, colour in zip(centres, (side // 4, side // 7), (big_shape, small_shape), (big, small),
                                          strict=True):
        style.draw_shape(draw, shape, cx, cy, r, style.COLOURS[colour], style.BACKGROUNDS[background])
    return image.resize((size, size), Image.LANCZOS)


def to_tensor(images) -> torch.Tensor:
    """PIL images -> [N, 3, H, W] float32 in [0, 1]."""
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                        for im in images])


def sample_style_pictures(size: int = SIZE) -> torch.Tensor:
    """The demo's training set (workflows/sample_style/*.png) at ``size``, [8, 3, size, size] in [0, 1]."""
    files = sorted((REPO / "workflows" / "sample_style").glob("*.png"))
    return to_tensor([Image.open(f).convert("RGB").resize((size, size), Image.LANCZOS) for f in files])


# =========================================================================== VAE


def encoder_state_dict() -> dict[str, torch.Tensor]:
    """TAESD encoder weights (`taesd_encoder.*` keys) that compute, per 8 x 8 cell, the mean R, G, B
    and the mean luminance of the cell shifted by half a cell up and left, each mapped to [-1, 1].
    Pixels come in as [0, 1] (TAESD.encode), every activation stays non-negative until the last
    conv, so ReLUs pass it and the blocks with zero weights are the identity."""
    from comfy.taesd.taesd import Encoder

    sd = {k: torch.zeros_like(v) for k, v in Encoder().state_dict().items()}
    lum = torch.tensor([0.299, 0.587, 0.114])
    w = sd["0.weight"]
    for c in range(3):
        w[c, c, 1, 1] = 1.0
    w[3, :, 1, 1] = lum
    for index in (2, 6, 10):  # stride-2 convs: a 2 x 2 mean of the taps below and right of centre
        for c in range(4):
            sd[f"{index}.weight"][c, c, 1:3, 1:3] = 0.25
    sd["10.weight"][3, 3] = 0.0
    sd["10.weight"][3, 3, 0:2, 0:2] = 0.25  # the shifted cell: half a cell up and left
    for c in range(4):
        sd["14.weight"][c, c, 1, 1] = 2.0
    sd["14.bias"][:] = -1.0
    return sd


class _Block(torch.nn.Module):
    """TAESD's residual block (comfy.taesd.taesd.Block) at any width, with initialised weights."""

    def __init__(self, width: int):
        super().__init__()
        conv = functools.partial(torch.nn.Conv2d, width, width, 3, padding=1)
        self.conv = torch.nn.Sequential(conv(), torch.nn.ReLU(), conv(), torch.nn.ReLU(), conv())

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


# Where the small decoder's layers sit in TAESD's Decoder (comfy.taesd.taesd.Decoder). Its other
# blocks get zero weights (a zero block is a ReLU, the identity on what a ReLU made), and the
# 128 px conv before the last block passes the channels through.
_DECODER_LAYERS = {"conv_in": 1, "block16": 3, "up32": 7, "block32": 8, "up64": 12, "block64": 13, "conv_out": 19}


class SmallDecoder(torch.nn.Module):
    """The trained part of the VAE decoder: TAESD's decoder at ``width`` channels with one block per
    resolution; its output at 128 px is one 3 x 3 conv over the 64 px features upsampled."""

    def __init__(self, width: int = DECODER_WIDTH):
        super().__init__()
        w = width
        self.conv_in = torch.nn.Conv2d(4, w, 3, padding=1)
        self.block16, self.block32, self.block64 = _Block(w), _Block(w), _Block(w)
        self.up32 = torch.nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.up64 = torch.nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.conv_out = torch.nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, z):
        up = functools.partial(torch.nn.functional.interpolate, scale_factor=2, mode="nearest")
        h = self.block16(torch.relu(self.conv_in(torch.tanh(z / 3) * 3)))
        h = self.block32(self.up32(up(h)))
        h = self.block64(self.up64(up(h)))
        return self.conv_out(up(h))


def decoder_state_dict(small: SmallDecoder) -> dict[str, torch.Tensor]:
    """The small decoder placed in TAESD's Decoder (`taesd_decoder.*` keys, 64 channels)."""
    from comfy.taesd.taesd import Decoder

    sd = {k: torch.zeros_like(v) for k, v in Decoder().state_dict().items()}
    for name, index in _DECODER_LAYERS.items():
        for key, value in getattr(small, name).state_dict().items():
            target = sd[f"{index}.{key}"]
            target[tuple(slice(0, n) for n in value.shape)] = value.detach()
    w = small.conv_in.out_channels
    for c in range(w):
        sd["17.weight"][c, c, 1, 1] = 1.0  # the 128 px conv after the last upsample passes through
    return sd


def encode(pixels: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> the encoder's output [N, 4, H/8, W/8] in [-1, 1] (what the
    decoder takes; ComfyUI's latent is this / VAE_SCALE), through TAESD's own Encoder."""
    from comfy.taesd.taesd import Encoder

    enc = Encoder()
    enc.load_state_dict(encoder_state_dict())
    with torch.no_grad():
        return enc(pixels)


def train_decoder(seed: int = SEED, steps: int = 150, log=print) -> SmallDecoder:
    """Trains the small decoder to invert the encoder on base pictures and the sample style
    (8 base pictures and the 8 sample pictures per batch: edges and frames), from a fixed seed. About a minute on 2 CPU cores."""
    torch.manual_seed(seed)
    decoder = SmallDecoder()
    combos = caption_pool()
    pictures = torch.cat([to_tensor([base_picture(combos[i % len(combos)], i) for i in range(64)]),
                          sample_style_pictures()])
    latents = encode(pictures)
    opt = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.cat([torch.randint(64, (8,), generator=g), torch.arange(64, 72)])
        loss = (decoder(latents[idx]) - pictures[idx]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            log(f"decoder step {step + 1}/{steps}: psnr {psnr_of(loss.item()):.1f} dB")
    return decoder.eval()


def psnr_of(mse) -> float:
    return float(-10 * math.log10(max(float(mse), 1e-12)))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two [.., 3, H, W] pictures in [0, 1]."""
    return psnr_of((a.clamp(0, 1) - b.clamp(0, 1)).square().mean())


# =========================================================================== UNet


def _ops(ratio: float):
    """ComfyUI operations for the small UNet: GroupNorm and LayerNorm count ``ratio`` times the
    channels they see, as the 320-channel UNet's norms count the zero channels around them."""
    import comfy.ops

    class GroupNorm(torch.nn.GroupNorm):
        def forward(self, x):
            b, c = x.shape[:2]
            g = x.reshape(b, self.num_groups, -1)
            n = g.shape[-1] * ratio
            mean = g.sum(-1, keepdim=True) / n
            var = g.square().sum(-1, keepdim=True) / n - mean.square()
            g = (g - mean) / torch.sqrt(var + self.eps)
            shape = (1, c) + (1,) * (x.dim() - 2)
            return g.reshape(x.shape) * self.weight.reshape(shape) + self.bias.reshape(shape)

    class LayerNorm(torch.nn.LayerNorm):
        def forward(self, x):
            n = x.shape[-1] * ratio
            mean = x.sum(-1, keepdim=True) / n
            var = x.square().sum(-1, keepdim=True) / n - mean.square()
            return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias

    class Ops(comfy.ops.disable_weight_init):
        pass

    Ops.GroupNorm, Ops.LayerNorm = GroupNorm, LayerNorm
    return Ops


def small_unet(width: int = UNET_WIDTH, seed: int = SEED):
    """ComfyUI's UNetModel in the tiny checkpoint's layout at ``width`` channels, initialised from
    ``seed``: weights 1/sqrt(fan_in), norms 1/sqrt(320/width) (their outputs about unit),
    the last conv of each residual path, the transformers' proj_out and the output conv zero.
    Its timestep embedding is 320-wide sinusoids, as the big model's."""
    sys.path.insert(0, str(REPO / "scripts"))
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from make_tiny_checkpoint import UNET_CONFIG

    ratio = FULL_WIDTH / width
    ops = _ops(ratio)
    unet = UNetModel(**{**UNET_CONFIG, "model_channels": width}, operations=ops, device="cpu")
    unet.time_embed[0] = ops.Linear(FULL_WIDTH, 4 * width)
    unet.model_channels = FULL_WIDTH  # only its timestep embedding reads this after construction
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in sorted(unet.state_dict().items()):
            if key.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(ratio ** -0.5)
            elif key.endswith(("out_layers.3.weight", "proj_out.weight", "out.2.weight")):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return unet


def _channel_map(small: int, full: int, width: int) -> torch.Tensor:
    """Index into the big model's dimension for each index of the small model's, by the sizes
    the layout gives them: the model width (each small channel one channel of its GroupNorm
    group), the skip concatenations (two of those), the 4x time-embedding and feed-forward
    widths (a prefix), GEGLU's 8x projection (a prefix of each half); anything else as it is."""
    k, big = width // 32, FULL_WIDTH // 32
    per_group = torch.arange(width)
    model_map = (per_group // k) * big + per_group % k
    if small == full:
        return torch.arange(small)
    if (small, full) == (width, FULL_WIDTH):
        return model_map
    if (small, full) == (2 * width, 2 * FULL_WIDTH):
        return torch.cat([model_map, model_map + FULL_WIDTH])
    if (small, full) == (4 * width, 4 * FULL_WIDTH):
        return torch.arange(small)
    if (small, full) == (8 * width, 8 * FULL_WIDTH):
        half = torch.arange(4 * width)
        return torch.cat([half, half + 4 * FULL_WIDTH])
    raise ValueError(f"no channel map from {small} to {full} for width {width}")


def embed_unet(small_sd: dict[str, torch.Tensor], full_shapes: dict[str, torch.Size],
               width: int = UNET_WIDTH) -> dict[str, torch.Tensor]:
    """The small UNet's weights placed in the 320-channel UNet (keys without a prefix), zeros
    elsewhere. Attention queries are scaled by sqrt(40 / head width) so each head's softmax
    temperature is the small model's. Raises KeyError/ValueError if the layouts differ."""
    out = {}
    for key, shape in full_shapes.items():
        value = small_sd[key].float()
        if key.endswith((".to_q.weight",)):
            value = value * (FULL_WIDTH / width) ** 0.5
        target = torch.zeros(shape)
        index = [_channel_map(value.shape[d], shape[d], width) for d in range(min(2, value.dim()))]
        if value.dim() == 0:
            target = value.clone()
        elif value.dim() == 1:
            target[index[0]] = value
        else:
            target[index[0][:, None], index[1][None, :]] = value
        out[key] = target
    return out


def model_sampling():
    """SD1.5's noise schedule (eps prediction), as ComfyUI's SD15 model uses it."""
    import comfy.model_sampling

    class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    return Sampling()


def encode_captions(clip, captions) -> dict[str, torch.Tensor]:
    """caption -> CLIP conditioning [1, 77, 768], through the checkpoint's CLIP as CLIPTextEncode runs it."""
    return {c: clip.encode_from_tokens(clip.tokenize(c)).float() for c in captions}


def pretrain_unet(clip, seed: int = SEED, steps: int = 320, batch: int = 8, lr: float = 1.5e-3,
                  jitters: int = 4, log=print):
    """Pretrains the small UNet (eps MSE at uniform timesteps, as SD1.5 was) on the base pictures:
    every caption of `caption_pool` drawn ``jitters`` times; DROPOUT of the batch uses an
    UNCONDITIONAL caption. Returns (unet, {"seconds", "loss_first", "loss_last"})."""
    t0 = time.perf_counter()
    combos = caption_pool()
    captions = [base_caption(*c) for c in combos]
    conds = encode_captions(clip, captions + list(UNCONDITIONAL))
    log(f"unet: {len(conds)} captions encoded in {time.perf_counter() - t0:.0f} s")
    pictures = to_tensor([base_picture(combos[i % len(combos)], i) for i in range(len(combos) * jitters)])
    x_all = encode(pictures) * (0.18215 / VAE_SCALE)  # what the UNet denoises (process_latent_in)
    ctx_all = torch.cat([conds[captions[i % len(combos)]] for i in range(len(x_all))])
    unc = torch.cat([conds[c] for c in UNCONDITIONAL])
    unet = small_unet(seed=seed)
    ms = model_sampling()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch,), generator=g)
        x0, ctx = x_all[idx], ctx_all[idx].clone()
        drop = torch.rand(batch, generator=g) < DROPOUT
        which = torch.randint(len(unc), (batch,), generator=g)
        ctx[drop] = unc[which[drop]]
        t = torch.randint(0, 1000, (batch,), generator=g)
        sigma = ms.sigmas[t]
        noise = torch.randn(x0.shape, generator=g)
        xt = x0 + noise * sigma[:, None, None, None]
        eps = unet(xt / (sigma[:, None, None, None] ** 2 + 1) ** 0.5, t.float(), context=ctx)
        loss = (eps - noise).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"unet step {step + 1}/{steps}: loss {sum(losses[-50:]) / 50:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    unet.eval()
    for p in params:
        p.requires_grad_(False)
    n = min(100, len(losses))
    return unet, {"seconds": time.perf_counter() - t0, "loss_first": sum(losses[:n]) / n,
                  "loss_last": sum(losses[-n:]) / n}


# =========================================================================== statistics


def luminance(image) -> np.ndarray:
    """PIL image or [3, H, W] / [H, W, 3] array in [0, 1] or 0-255 -> [H, W] luminance in [0, 1]."""
    if isinstance(image, Image.Image):
        a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    else:
        a = np.asarray(image, dtype=np.float64)
        a = a.transpose(1, 2, 0) if a.shape[0] == 3 else a
        a = a / 255 if a.max() > 1.5 else a
    return a @ np.array([0.299, 0.587, 0.114])


def frame_contrast(image, band: float = 1 / 16) -> float:
    """Mean luminance of the outer band (``band`` of the side on each edge: 8 px at 128 px, twice
    the sample style's frame) minus that of the centre (the middle half). The sample pictures:
    about -0.2 (a dark frame round lighter pictures); frameless pictures on a light background:
    positive (their shapes are darker than the background). In [-1, 1]."""
    lum = luminance(image)
    h, w = lum.shape
    b = max(1, round(min(h, w) * band))
    mask = np.zeros_like(lum, dtype=bool)
    mask[:b], mask[-b:], mask[:, :b], mask[:, -b:] = True, True, True, True
    centre = lum[h // 4: h - h // 4, w // 4: w - w // 4]
    return float(lum[mask].mean() - centre.mean())


def colour_distance(image, colour: str, box=(0.3, 0.3, 0.45, 0.45)) -> dict[str, float]:
    """How near the picture's region ``box`` (left, top, right, bottom as fractions of the side:
    by default the middle of the large shape in the sample layout) is to the named colour of the
    sample vocabulary: {"distance": RGB distance to it in [0, 1] units, "nearest": the vocabulary
    colour nearest to the region's mean, "margin": distance to the second nearest minus to it}."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    h, w = a.shape[:2]
    left, top, right, bottom = box
    mean = a[int(top * h): int(bottom * h), int(left * w): int(right * w)].reshape(-1, 3).mean(0)
    vocab = {**style.COLOURS, **style.BACKGROUNDS}
    dist = {name: float(np.linalg.norm(mean - np.array(rgb) / 255)) for name, rgb in vocab.items()}
    nearest = sorted(dist, key=dist.get)
    return {"distance": dist[colour], "nearest": nearest[0], "margin": dist[nearest[1]] - dist[nearest[0]],
            "mean_rgb": [round(float(v), 3) for v in mean]}


# =========================================================================== the checkpoint


FILE_NAME = "trilora-drawing-sd15.safetensors"


def spec() -> str:
    """A digest of what the file is made from: the source of every function and constant that
    builds it (not the statistics); a file that records another spec is stale and is built again."""
    import hashlib
    import inspect

    parts = [caption_pool, base_caption, base_picture, sample_style_pictures, encoder_state_dict, _Block,
             SmallDecoder, decoder_state_dict, train_decoder, _ops, small_unet, _channel_map, embed_unet,
             model_sampling, encode_captions, pretrain_unet, vae_state_dict, assemble, build]
    text = "".join(inspect.getsource(p) for p in parts)
    text += repr((SIZE, VAE_SCALE, DECODER_WIDTH, UNET_WIDTH, UNCONDITIONAL, DROPOUT, _DECODER_LAYERS))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def description(seed: int = SEED) -> str:
    return f"comfyui-trilora drawing model (make demo), seed {seed}, spec {spec()}"


def vae_state_dict(decoder: SmallDecoder) -> dict[str, torch.Tensor]:
    """TAESD's keys (as under `first_stage_model.`): the set encoder, the decoder placed, the scale."""
    vae = {f"taesd_encoder.{k}": v for k, v in encoder_state_dict().items()}
    vae.update({f"taesd_decoder.{k}": v for k, v in decoder_state_dict(decoder).items()})
    vae.update(vae_scale=torch.tensor(VAE_SCALE), vae_shift=torch.tensor(0.0))
    return vae


def assemble(tensors: dict[str, torch.Tensor], decoder: SmallDecoder, unet) -> dict[str, torch.Tensor]:
    """The fixture's tensors (its CLIP-L and key layout) with this VAE and the small UNet embedded in
    place of its random ones; fp16, sorted keys. Raises KeyError if ``tensors`` is not the tiny
    SD1.5 fixture's layout."""
    tensors = dict(tensors)
    prefix = "model.diffusion_model."
    shapes = {k[len(prefix):]: v.shape for k, v in tensors.items() if k.startswith(prefix)}
    for key, value in embed_unet(unet.state_dict(), shapes).items():
        tensors[prefix + key] = value
    for key, value in vae_state_dict(decoder).items():
        if "first_stage_model." + key not in tensors:
            raise KeyError(f"no first_stage_model.{key}: not the tiny SD1.5 fixture's layout")
        tensors["first_stage_model." + key] = value
    return {k: v.to(torch.float16).contiguous() for k, v in sorted(tensors.items())}


def build(fixture: Path, seed: int = SEED, log=print) -> tuple[dict[str, torch.Tensor], dict]:
    """The drawing checkpoint's tensors from the random fixture at ``fixture`` (`assemble`), with the
    decoder and UNet trained here. Returns (tensors, {"decoder_seconds", "psnr": per sample
    picture at SIZE px, "unet_seconds", "loss_first", "loss_last"})."""
    import comfy.sd
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import load_file

    clip = comfy.sd.load_checkpoint_guess_config(str(fixture), output_vae=False)[1]
    t0 = time.perf_counter()
    decoder = train_decoder(seed, log=log)
    info = {"decoder_seconds": round(time.perf_counter() - t0, 1)}
    taesd = TAESD()
    taesd.load_state_dict(vae_state_dict(decoder))
    pictures = sample_style_pictures()
    with torch.no_grad():
        decoded = (taesd.decode(taesd.encode(pictures * 2 - 1)) + 1) / 2
    info["psnr"] = [round(psnr(decoded[i], pictures[i]), 2) for i in range(len(pictures))]
    log(f"VAE: PSNR on the sample pictures at {SIZE} px: {min(info['psnr']):.1f}-{max(info['psnr']):.1f} dB")
    unet, unet_info = pretrain_unet(clip, seed, log=log)
    info.update(unet_seconds=round(unet_info["seconds"], 1), loss_first=unet_info["loss_first"],
                loss_last=unet_info["loss_last"])
    return assemble(load_file(str(fixture)), decoder, unet), info


def is_current(path: Path, seed: int = SEED) -> bool:
    from safetensors import safe_open

    if not path.exists():
        return False
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("description") == description(seed)


def write(path: Path, fixture: Path, seed: int = SEED, log=print) -> dict:
    """Builds the drawing checkpoint from the fixture and writes it atomically; returns build()'s info.
    Runs torch on 2 threads, so the same seed gives the same bytes on any machine with its ops."""
    import os
    import tempfile

    from safetensors.torch import save_file

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tensors, info = build(fixture, seed, log)
    finally:
        torch.set_num_threads(threads)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        save_file(tensors, tmp, metadata={"description": description(seed)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return info
