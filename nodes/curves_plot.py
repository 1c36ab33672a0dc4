"""For TriLoRATrainingCurves (nodes/curves.py): a run's curves from its LOSS_MAP on one picture:
the training loss per step and the held-out error at each evaluation (top, log scale), the base
drift (bottom), and the kept step marked. Drawn with PIL only; no ComfyUI import."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from .plot_style import BACKGROUND, GRID, GUIDE, INK, load_font

WIDTH, HEIGHT = 1024, 640
TRAIN, TRAIN_MEAN, HELDOUT, DRIFT, KEPT = (170, 200, 230), (0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167)


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def moving_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


class _Panel:
    def __init__(self, box, x_max: int, values: list[float], log: bool):
        self.x0, self.y0, self.x1, self.y1 = box
        self.x_max, self.log = max(x_max, 1), log and all(v > 0 for v in values)
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if self.log:
            lo, hi = math.log10(lo), math.log10(hi)
        pad = (hi - lo) * 0.05 or (abs(hi) * 0.1 or 1.0)
        # Errors and drift are never negative: a linear axis of them starts at 0 at the lowest.
        self.lo, self.hi = (lo - pad if self.log or lo < 0 else max(lo - pad, 0.0)), hi + pad

    def x(self, step: float) -> float:
        return self.x0 + step / self.x_max * (self.x1 - self.x0)

    def y(self, value: float) -> float:
        v = math.log10(max(value, 1e-30)) if self.log else value
        return self.y1 - (v - self.lo) / (self.hi - self.lo) * (self.y1 - self.y0)

    def frame(self, draw, title: str, font) -> None:
        for n in range(5):
            v = self.lo + (self.hi - self.lo) * n / 4
            y = self.y1 - n / 4 * (self.y1 - self.y0)
            draw.line([(self.x0, y), (self.x1, y)], fill=GRID)
            draw.text((self.x0 - 6, y), f"{10 ** v if self.log else v:.3g}", fill=INK, font=font, anchor="rm")
        for n in range(6):
            step = round(self.x_max * n / 5)
            draw.line([(self.x(step), self.y1), (self.x(step), self.y1 + 4)], fill=INK)
            draw.text((self.x(step), self.y1 + 6), str(step), fill=INK, font=font, anchor="mt")
        draw.rectangle([self.x0, self.y0, self.x1, self.y1], outline=INK)
        draw.text((self.x0, self.y0 - 6), title + (" (log scale)" if self.log else ""), fill=INK, font=font,
                  anchor="lb")

    def line(self, draw, steps, values, color, width: int = 2, markers: bool = False) -> None:
        if not values:  # a curve this run did not measure (no held-out images, evaluations off)
            return
        points = [(self.x(s), self.y(v)) for s, v in zip(steps, values, strict=True)
                  if v is not None and math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=color, width=width)
        if markers or len(points) == 1:
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)


def plot(loss_map: dict, title: str, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """Top: training loss per step (light), its moving mean and the held-out error at each
    evaluation (model's objective). Bottom: base drift. A vertical line marks ``best_step``."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, big = load_font(13), load_font(16)
    loss = [float(v) for v in loss_map.get("loss", [])]
    evals = list(loss_map.get("eval_steps", []))
    first = evals[0] if evals else 0  # a resumed run's steps count on from the file's
    steps = [first + k + 1 for k in range(len(loss))]
    x_max = max(steps + evals + [1])
    heldout, drift = loss_map.get("heldout") or [], loss_map.get("drift") or []
    left, right = 80, width - 30
    top = _Panel((left, 70, right, int(height * 0.62)), x_max, _finite(loss + heldout), log=True)
    bottom = _Panel((left, int(height * 0.62) + 50, right, height - 40), x_max, _finite(drift) or [0.0], log=False)
    draw.text((left, 14), title, fill=INK, font=big)
    top.frame(draw, "training loss (per step, its moving mean) and held-out error", font)
    bottom.frame(draw, "base drift: mean squared change of the prediction for the preservation prompts", font)
    top.line(draw, steps, loss, TRAIN, width=1)
    top.line(draw, steps, moving_mean(loss, max(1, len(loss) // 20)), TRAIN_MEAN)
    top.line(draw, evals, heldout, HELDOUT, markers=True)
    bottom.line(draw, evals, drift, DRIFT, markers=True)
    best = loss_map.get("best_step")
    if best is not None:
        for panel in (top, bottom):
            x = panel.x(best)
            for y in range(int(panel.y0), int(panel.y1), 8):
                draw.line([(x, y), (x, min(y + 4, panel.y1))], fill=KEPT, width=2)
        draw.text((top.x(best) + 4, top.y0 + 4), f"kept: step {best}", fill=KEPT, font=font, anchor="lt")
    legend = [("training loss", TRAIN_MEAN), ("held-out", HELDOUT), ("drift", DRIFT)]
    lx = right - 330
    for name, color in legend:
        draw.rectangle([lx, 20, lx + 14, 34], fill=color)
        draw.text((lx + 20, 27), name, fill=INK, font=font, anchor="lm")
        lx += 110
    draw.text(((left + right) / 2, height - 14), "step", fill=GUIDE, font=font, anchor="mm")
    return image


def summary(loss_map: dict) -> str:
    """One line per evaluation: step, held-out errors, drift; then the kept step."""
    names = [n for n in ("heldout", "heldout_x0", "drift", "drift_x0") if loss_map.get(n)]
    lines = ["step  " + "  ".join(names)]
    for i, step in enumerate(loss_map.get("eval_steps", [])):
        cells = [loss_map[n][i] for n in names]
        lines.append(f"{step}  " + "  ".join("-" if v is None else f"{v:.5g}" for v in cells))
    if loss_map.get("best_step") is not None:
        lines.append(f"kept: step {loss_map['best_step']}")
    return "\n".join(lines)
