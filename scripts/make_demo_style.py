"""Paint the demo's style image: short brush strokes that follow a swirling flow field, in a
night-sky palette. The repository ships only images it makes itself; this is how
configs/images/swirls.png was made (deterministic: the same file every time)."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 384
PALETTE = [(20, 40, 110), (40, 80, 160), (70, 120, 200), (230, 200, 60), (250, 230, 140),
           (240, 240, 220), (20, 25, 60), (90, 150, 190)]


def flow(x, y, centres):
    """Angle of the field at (x, y): rotation around a few centres, plus a gentle wave."""
    angle = 0.6 * np.sin(y / 40.0) + 0.4 * np.cos(x / 55.0)
    vx, vy = np.cos(angle), np.sin(angle)
    for cx, cy, strength in centres:
        dx, dy = x - cx, y - cy
        r2 = dx * dx + dy * dy + 400.0
        vx, vy = vx - strength * dy / r2 * 60, vy + strength * dx / r2 * 60
    return np.arctan2(vy, vx)


def paint(seed: int = 7) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (SIZE, SIZE), PALETTE[6])
    draw = ImageDraw.Draw(img)
    centres = [(110, 100, 2.5), (270, 150, -2.0), (190, 300, 1.5)]
    for _ in range(9000):
        x, y = rng.uniform(0, SIZE, 2)
        # Warm strokes near the swirl centres, cool ones elsewhere.
        near = min(np.hypot(x - cx, y - cy) for cx, cy, _ in centres)
        warm = near < 45 and rng.random() < 0.8
        colour = PALETTE[rng.integers(3, 6)] if warm else PALETTE[rng.integers(0, 3)]
        colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in colour)
        points = [(x, y)]
        for _ in range(rng.integers(6, 14)):
            a = flow(x, y, centres)
            x, y = x + 3 * np.cos(a), y + 3 * np.sin(a)
            points.append((x, y))
        draw.line(points, fill=colour, width=int(rng.integers(2, 5)))
    return img.filter(ImageFilter.SMOOTH)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "configs/images/swirls.png")
    paint().save(out, optimize=True)
    print(out)
