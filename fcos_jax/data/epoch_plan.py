"""The training epoch plan (NumPy, no TensorFlow; docs/architecture.md#conventions).

1. Every image gets the smallest canvas (H, W) that holds it at the largest training scale
   (`data.canvases`, default: landscape and portrait of the largest scale, /32), as mmdet's
   group sampler groups by aspect (`train_canvases`).
2. `plan_epoch(seed, epoch)`: each canvas group is shuffled and filled up to whole global batches
   by repeating its own images, the batches are shuffled, and every slot draws its scale
   (`train.multiscale`, 'value' or 'range' mode, as mmdet v1 `random_scale`) and flip
   (`train.flip_ratio`). The plan depends on (seed, epoch) and the examples only, so every
   process computes the same one; the pipeline (pipeline.py) loads its slice of each batch.
"""

from collections.abc import Sequence

import numpy as np

MULTISCALE_MODES = ("value", "range")


# --------------------------------------------------------------------------------------------
# Scales


def check_multiscale(scales: Sequence[Sequence[float]], mode: str) -> list[tuple[int, int]]:
    """train.multiscale as [(long, short)]; raises ValueError naming the field."""
    if mode not in MULTISCALE_MODES:
        raise ValueError(f"train.multiscale_mode: expected one of {MULTISCALE_MODES}, got {mode!r}")
    out = []
    for s in scales:
        if len(s) != 2 or min(s) < 1:
            raise ValueError(f"train.multiscale: expected (long, short) pairs, got {scales}")
        out.append((int(max(s)), int(min(s))))
    if not out:
        raise ValueError("train.multiscale: at least one scale is needed")
    if mode == "range" and len(out) != 2:
        raise ValueError(f"train.multiscale: 'range' mode needs two scales, got {scales}")
    return out


def sample_scales(
    rng: np.random.Generator, n: int, scales: Sequence[tuple[int, int]], mode: str
) -> np.ndarray:
    """[n, 2] int (long, short) training scales, as mmdet v1 `random_scale`: 'value' picks one of
    `scales` uniformly; 'range' draws long and short edges uniformly (inclusive) between the two
    scales' long and short edges."""
    table = np.asarray(scales, np.int64)
    if mode == "value":
        return table[rng.integers(0, len(table), size=n)]
    longs, shorts = table[:, 0], table[:, 1]
    long_edge = rng.integers(longs.min(), longs.max() + 1, size=n)
    short_edge = rng.integers(shorts.min(), shorts.max() + 1, size=n)
    return np.stack([long_edge, short_edge], axis=-1)


def largest_scales(scales: Sequence[tuple[int, int]], mode: str) -> list[tuple[int, int]]:
    """The scales whose resized sizes bound every size `sample_scales` can give (per side)."""
    if mode == "value":
        return list(scales)
    return [(max(s[0] for s in scales), max(s[1] for s in scales))]
