"""Detections drawn on an image (predict --draw): a box and a 'name score' label per detection."""

import cv2
import numpy as np


def label_color(label: int) -> tuple[int, int, int]:
    """A BGR colour per class channel, the same in every image."""
    rng = np.random.default_rng(label)
    return tuple(int(c) for c in rng.integers(64, 256, 3))


def draw_detections(
    image_bgr: np.ndarray, dets: dict[str, np.ndarray], score_thr: float = 0.0
) -> np.ndarray:
    """A copy of `image_bgr` [H, W, 3] uint8 with the box and 'name score' of every detection
    scoring >= score_thr drawn, lowest score first, so that where boxes of one object overlap
    (one per class) the best one's label is on top."""
    canvas = image_bgr.copy()
    thickness = max(1, round(max(canvas.shape[:2]) / 500))
    scores = np.asarray(dets["scores"], dtype=np.float32)
    order = [i for i in np.argsort(scores, kind="stable") if scores[i] >= score_thr]
    for i in order:
        box, score, label, name = dets["boxes"][i], scores[i], dets["labels"][i], dets["names"][i]
        color = label_color(int(label))
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        text = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = max(y1 - th - base, 0)
        cv2.rectangle(canvas, (x1, top), (x1 + tw, top + th + base), color, -1)
        cv2.putText(
            canvas, text, (x1, top + th), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA
        )
    return canvas
