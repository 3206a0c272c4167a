"""Canvases: the few fixed (H, W) input shapes images are zero padded into (bottom/right).

Training always pads into canvases (`data.canvases`, default landscape and portrait of the largest
training scale); evaluation, prediction and the exported detectors do when `data.eval_pad` is
'canvas', into landscape and portrait of the test scale (`preprocess.scale`), whatever the
training canvases are: an exported artifact of either canvas then detects what evaluation and
`Detector` detect. One rule places an image (`canvas_for`, `assign_canvases`): the smallest-area
canvas that holds its resized size, the first listed on a tie; of the landscape and portrait
canvases of one scale (equal areas, landscape listed first) that is the landscape one whenever
the image fits it, else the portrait one. NumPy only: used by the data pipeline,
`inference.Detector` and `fcos_jax.export`.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

EVAL_PAD_MODES = ("multiple", "canvas")


def round_up(x: int, divisor: int) -> int:
    """The smallest multiple of `divisor` >= x."""
    return -(-int(x) // divisor) * divisor


def default_canvases(scales: Sequence[tuple[int, int]], size_divisor: int) -> list[tuple[int, int]]:
    """Landscape (short, long) and portrait (long, short) of the largest scale, rounded up to
    `size_divisor`; one canvas when they coincide."""
    long_side = round_up(max(s[0] for s in scales), size_divisor)
    short_side = round_up(max(s[1] for s in scales), size_divisor)
    canvases = [(short_side, long_side), (long_side, short_side)]
    return sorted(set(canvases), key=canvases.index)


def check_canvases(canvases: Any, size_divisor: int) -> list[tuple[int, int]]:
    """`data.canvases` as [(H, W)] ints; ValueError naming the field unless each side is a
    positive multiple of `size_divisor`."""
    out = []
    for c in canvases:
        if len(c) != 2 or any(int(v) < 1 or int(v) % size_divisor for v in c):
            raise ValueError(
                f"data.canvases: expected (H, W) pairs of multiples of {size_divisor}, got "
                f"{canvases}"
            )
        out.append((int(c[0]), int(c[1])))
    return out


def assign_canvases(
    max_hw: np.ndarray, canvases: Sequence[tuple[int, int]], filenames: Sequence[str]
) -> np.ndarray:
    """[N] int: the smallest-area canvas (ties: the first listed) holding each image's max_hw
    [N, 2] (h, w). ValueError naming the first image (`filenames`) that fits none."""
    table = np.asarray(canvases, np.int64)  # [C, 2]
    fits = (max_hw[:, None, :] <= table[None, :, :]).all(-1)  # [N, C]
    area = table[:, 0] * table[:, 1]
    cost = np.where(fits, area[None, :], np.iinfo(np.int64).max)
    choice = np.argmin(cost, axis=1)
    missing = ~fits.any(axis=1)
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise ValueError(
            f"data.canvases: no canvas in {list(canvases)} holds {filenames[i]} resized to "
            f"{tuple(max_hw[i])}"
        )
    return choice


def canvas_for(
    resized_hw: Sequence[int], canvases: Sequence[tuple[int, int]], name: str = "image"
) -> tuple[int, int]:
    """The canvas (H, W) one image of resized size (h, w) goes to: `assign_canvases`' rule (the
    smallest area that holds it, the first listed on a tie), so for `scale_canvases` the landscape
    canvas whenever h and w fit it, else the portrait one. ValueError naming `name` when none
    holds it."""
    hw = np.asarray([[int(resized_hw[0]), int(resized_hw[1])]], np.int64)
    return tuple(canvases[int(assign_canvases(hw, canvases, [name])[0])])


def scale_canvases(config: Any) -> list[tuple[int, int]]:
    """Landscape and portrait (in that order; one when they coincide) of `preprocess.scale`,
    rounded up to `preprocess.size_divisor`: the canvases of canvas-mode evaluation, `Detector`
    and the exported artifacts (800 x 1344 and 1344 x 800 for (1333, 800))."""
    divisor = int(config.preprocess.size_divisor)
    scale = tuple(int(v) for v in config.preprocess.scale)
    return default_canvases([(max(scale), min(scale))], divisor)


def eval_canvases(config: Any) -> list[tuple[int, int]] | None:
    """The canvases of evaluation and prediction: None for `data.eval_pad = 'multiple'` (each
    image padded to the next multiple of `preprocess.size_divisor`), else `scale_canvases` (the
    training canvases, `data.canvases`, belong to the training scales)."""
    if config.data.eval_pad == "multiple":
        return None
    if config.data.eval_pad != "canvas":
        raise ValueError(
            f"data.eval_pad: expected one of {EVAL_PAD_MODES}, got {config.data.eval_pad!r}"
        )
    return scale_canvases(config)


def pad_to(image: np.ndarray, canvas_hw: tuple[int, int], name: str = "image") -> np.ndarray:
    """Zero pad [h, w, C] at the bottom/right to [H, W, C] = canvas_hw (h <= H, w <= W)."""
    h, w = image.shape[:2]
    ch, cw = canvas_hw
    if h > ch or w > cw:
        raise ValueError(f"{name}: {h}x{w} does not fit the {ch}x{cw} canvas")
    if (h, w) == (ch, cw):
        return image
    return np.pad(image, ((0, ch - h), (0, cw - w), (0, 0)))
