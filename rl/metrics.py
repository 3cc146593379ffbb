"""Metrics to JSONL (one object per step, appended, so a resumed run continues the same file) and a reward
curve as a PNG drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: str | Path, resume_from_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.read() if self.path.exists() else []
        if resume_from_step is not None:  # drop what was logged after the checkpoint being resumed
            rows = [r for r in rows if r.get("step", 0) < resume_from_step]
        else:
            rows = []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict], keys: list[str], out: str | Path, title: str = "") -> Path:
    """Line chart of `keys` against `step` (points where a key is missing are skipped)."""
    from PIL import Image, ImageDraw

    width, height, margin = 720, 420, 56
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    series = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None] for k in keys}
    points = [p for s in series.values() for p in s]
    if not points:
        raise ValueError(f"nothing to plot: no rows have any of {keys}")
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(0.0, min(p[1] for p in points)), max(1.0, max(p[1] for p in points))
    sx = lambda x: margin + (x - x0) / max(x1 - x0, 1) * (width - 2 * margin)  # noqa: E731
    sy = lambda y: height - margin - (y - y0) / max(y1 - y0, 1e-9) * (height - 2 * margin)  # noqa: E731
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y0 + frac * (y1 - y0)
        draw.line([margin - 4, sy(y), margin, sy(y)], fill="black")
        draw.text((4, sy(y) - 6), f"{y:.2f}", fill="black")
    draw.text((width // 2 - 20, height - margin + 16), "step", fill="black")
    draw.text((margin, 16), title, fill="black")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, (key, pts) in enumerate(series.items()):
        color = colors[i % len(colors)]
        xy = [(sx(x), sy(y)) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((width - margin - 150, margin + 8 + 14 * i), key, fill=color)
    out = Path(out)
    image.save(out)
    return out
