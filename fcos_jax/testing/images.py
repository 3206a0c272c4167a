"""Natural-looking synthetic images (gradients, filled shapes, noise) for parity checks."""

import cv2
import numpy as np


def natural_image(h: int, w: int, seed: int) -> np.ndarray:
    """[h, w, 3] uint8 RGB: smooth gradients, a few filled shapes and noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [255 * xs / max(w - 1, 1), 255 * ys / max(h - 1, 1), 128 + 100 * np.sin(xs / 9 + ys / 13)],
        axis=-1,
    )
    for _ in range(4):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        color = [int(c) for c in rng.integers(0, 256, 3)]
        cv2.rectangle(img, (int(x0), int(y0)), (int(x0 + w // 4), int(y0 + h // 5)), color, -1)
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), h // 6 + 1, color, -1)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
