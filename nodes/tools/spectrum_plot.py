"""For TriLoRASpectrum (nodes/tools/spectrum.py): each layer's singular values and cumulative energy as a
picture, and a text summary of how many directions each part of the model really uses. Drawn with
PIL only; no ComfyUI import."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...trilora_core import GROUPS, TriLoRALayer, block_group, energy_rank, rank_range, spectrum
from ..plot_style import BACKGROUND, GRID, GUIDE, INK, load_font

WIDTH, HEIGHT = 1024, 768
COLORS = {  # colour-blind friendly (Okabe-Ito), one per group
    "UNet input blocks": (0, 114, 178),
    "UNet middle block": (230, 159, 0),
    "UNet output blocks": (0, 158, 115),
    "UNet other": (120, 120, 120),
    "Text encoder": (213, 94, 0),
    "Text encoder 2": (204, 121, 167),
    "Text encoder 3": (86, 180, 233),
    "Other": (0, 0, 0),
}
SHARES = (0.9, 0.99)


@dataclass
class LayerSpectrum:
    prefix: str
    group: str
    values: np.ndarray  # singular values of delta W, descending (float64)

    @property
    def energy(self) -> float:
        return float((self.values ** 2).sum())

    def rank_for(self, share: float) -> int:
        return energy_rank(torch.from_numpy(self.values), share)

    def cumulative(self) -> np.ndarray:
        total = self.energy
        cum = np.cumsum(self.values ** 2)
        return cum / total if total > 0 else np.ones_like(cum)


def layer_spectra(layers: dict[str, TriLoRALayer]) -> list[LayerSpectrum]:
    return [LayerSpectrum(prefix, block_group(prefix), spectrum(layer).double().cpu().numpy())
            for prefix, layer in sorted(layers.items())]


# --------------------------------------------------------------------------- text


def summary(spectra: list[LayerSpectrum], source: str) -> str:
    """Per group: layers, ranks, directions for 90% / 99% of each layer's energy, energy share."""
    ranks = [len(s.values) for s in spectra]
    total = sum(s.energy for s in spectra)
    lines = [f"TriLoRA spectrum of {source}: {len(spectra)} layers, rank {rank_range(ranks)}",
             "r90 / r99 = directions holding 90% / 99% of a layer's energy (sum of squared singular values); "
             "mean and max over the group's layers.",
             f"{'group':<20}{'layers':>7}{'rank':>9}{'r90 mean':>10}{'max':>5}{'r99 mean':>10}{'max':>5}{'energy':>9}"]
    for group in GROUPS:
        members = [s for s in spectra if s.group == group]
        if not members:
            continue
        rk = [len(s.values) for s in members]
        r90 = [s.rank_for(0.9) for s in members]
        r99 = [s.rank_for(0.99) for s in members]
        share = sum(s.energy for s in members) / total if total > 0 else 0.0
        lines.append(f"{group:<20}{len(members):>7}{rank_range(rk):>9}{np.mean(r90):>10.1f}{max(r90):>5}"
                     f"{np.mean(r99):>10.1f}{max(r99):>5}{share:>8.1%}")
    for share in SHARES:
        kept = [s.rank_for(share) for s in spectra]
        size = sum(kept) / sum(ranks)
        lines.append(f"energy {share:g} at load (or Resize TriLoRA) keeps {np.mean(kept):.1f} directions per layer "
                     f"on average: {size:.0%} of the factors.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- picture


class _Axes:
    """A plot panel: data (x index from 1, y) to pixels, optional log10 y."""

    def __init__(self, box, x_max: int, y_lo: float, y_hi: float, log: bool):
        self.x0, self.y0, self.x1, self.y1 = box
        self.x_max, self.log = max(x_max, 1), log
        self.lo, self.hi = (math.log10(y_lo), math.log10(y_hi)) if log else (y_lo, y_hi)
        if self.hi <= self.lo:
            self.hi = self.lo + 1.0

    def x(self, index: float) -> float:
        if self.x_max == 1:
            return (self.x0 + self.x1) / 2
        return self.x0 + (index - 1) / (self.x_max - 1) * (self.x1 - self.x0)

    def y(self, value: float) -> float:
        v = math.log10(max(value, 10 ** self.lo)) if self.log else value
        v = min(max(v, self.lo), self.hi)
        return self.y1 - (v - self.lo) / (self.hi - self.lo) * (self.y1 - self.y0)


def _x_ticks(x_max: int) -> list[int]:
    if x_max <= 1:
        return [1]
    step = max(1, 10 ** math.floor(math.log10(x_max / 4)))
    for mult in (1, 2, 5, 10):
        if x_max / (step * mult) <= 8:
            step *= mult
            break
    ticks = [1] + list(range(step, x_max + 1, step))
    return sorted(set(ticks + [x_max]))


def _frame(draw: ImageDraw.ImageDraw, axes: _Axes, title: str, font, y_ticks: list[tuple[float, str]],
           x_max: int) -> None:
    for value, label in y_ticks:
        y = axes.y(value)
        draw.line([(axes.x0, y), (axes.x1, y)], fill=GRID)
        draw.text((axes.x0 - 6, y), label, fill=INK, font=font, anchor="rm")
    for tick in _x_ticks(x_max):
        x = axes.x(tick)
        draw.line([(x, axes.y1), (x, axes.y1 + 4)], fill=INK)
        draw.text((x, axes.y1 + 6), str(tick), fill=INK, font=font, anchor="mt")
    draw.rectangle([axes.x0, axes.y0, axes.x1, axes.y1], outline=INK)
    draw.text((axes.x0, axes.y0 - 6), title, fill=INK, font=font, anchor="lb")


def _polyline(draw, points, color, markers: bool) -> None:
    if len(points) > 1:
        draw.line(points, fill=color, width=2)
    if markers or len(points) == 1:
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)


def plot(spectra: list[LayerSpectrum], title: str, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """Top: every layer's singular values (log scale). Bottom: their cumulative energy share,
    with guides at 90% and 99%. One colour per model part, legend on the right."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, big = load_font(13), load_font(16)
    x_max = max(len(s.values) for s in spectra)
    left, right, legend_w = 70, width - 210, 190
    top_box = (left, 60, right, int(height * 0.5))
    bottom_box = (left, int(height * 0.5) + 60, right, height - 40)
    draw.text((left, 14), title, fill=INK, font=big)

    positive = np.concatenate([s.values[s.values > 0] for s in spectra] or [np.zeros(0)])
    hi = float(positive.max()) if positive.size else 1.0
    lo = max(float(positive.min()) if positive.size else hi / 10, hi * 1e-4)
    lo_decade, hi_decade = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if hi_decade == lo_decade:
        hi_decade += 1
    top = _Axes(top_box, x_max, 10.0 ** lo_decade, 10.0 ** hi_decade, log=True)
    _frame(draw, top, "singular values of each layer's delta W (log scale) by index", font,
           [(10.0 ** d, f"1e{d}") for d in range(lo_decade, hi_decade + 1)], x_max)
    bottom = _Axes(bottom_box, x_max, 0.0, 1.0, log=False)
    _frame(draw, bottom, "cumulative share of each layer's energy", font,
           [(v, f"{v:.0%}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)], x_max)
    for share in SHARES:
        y = bottom.y(share)
        for x in range(int(bottom.x0), int(bottom.x1), 8):
            draw.line([(x, y), (min(x + 4, bottom.x1), y)], fill=GUIDE)
        draw.text((bottom.x1 + 4, y), f"{share:.0%}", fill=GUIDE, font=font, anchor="lm")

    markers = x_max <= 16
    present = [g for g in GROUPS if any(s.group == g for s in spectra)]
    for group in present:
        color = COLORS[group]
        for s in spectra:
            if s.group != group:
                continue
            idx = range(1, len(s.values) + 1)
            _polyline(draw, [(top.x(i), top.y(v)) for i, v in zip(idx, s.values, strict=True)], color, markers)
            _polyline(draw, [(bottom.x(i), bottom.y(c)) for i, c in zip(idx, s.cumulative(), strict=True)],
                      color, markers)

    lx, ly = width - legend_w + 10, 60
    for group in present:
        count = sum(1 for s in spectra if s.group == group)
        draw.rectangle([lx, ly, lx + 14, ly + 14], fill=COLORS[group])
        draw.text((lx + 20, ly + 7), f"{group} ({count})", fill=INK, font=font, anchor="lm")
        ly += 22
    draw.text(((left + right) / 2, height - 14), "index of the singular value (1 = strongest direction)",
              fill=INK, font=font, anchor="mm")
    return image

