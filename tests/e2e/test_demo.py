"""`make demo` as a user runs it (scripts/demo.py: server, frontend converter, both workflows), on
the drawing model: the TriLoRA it trains puts the sample style's frame on the generated pictures,
and the pictures are measured here from the PNG files, not taken from the demo's word."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from harness import picture_stats

REPO = Path(__file__).resolve().parents[2]

STRENGTHS = (0.0, 0.5, 1.0, 1.5)


@pytest.mark.timeout(1800)  # a few minutes alone; the suite's 900 s limit is too tight on a shared machine
def test_demo_trains_the_frame_and_keeps_the_content(tmp_path):
    out = tmp_path / "demo_output"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strengths"] == list(STRENGTHS)
    pictures = [Image.open(out / f"generate_strength_{s}.png") for s in STRENGTHS]
    contrast = [picture_stats.frame_contrast(p) for p in pictures]
    assert contrast == summary["style"]["frame_contrast"] or \
        max(abs(a - b) for a, b in zip(contrast, summary["style"]["frame_contrast"], strict=True)) < 1e-3
    # strength 0 is the base model: no frame, as in its own pictures
    assert contrast[0] > 0.0, contrast
    # strength 1: the border is darker than the centre by a clear margin, as in the sample pictures
    assert contrast[2] < picture_stats.FRAME_PRESENT, contrast
    # the frame grows with the strength
    assert all(b < a for a, b in zip(contrast, contrast[1:], strict=False)), contrast
    # the content is kept: the prompt's large shape is red, and so is its region at strength 1
    content = picture_stats.colour_distance(pictures[2], "red")
    assert content["nearest"] == "red", content
    assert summary["style"]["content"]["nearest"] == "red"
    # the strip holds the four pictures side by side, labelled
    strip = Image.open(out / "strengths.png")
    assert strip.width >= 4 * pictures[0].width and strip.height > pictures[0].height
