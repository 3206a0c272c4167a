"""The training epoch plan (NumPy, no TensorFlow; docs/architecture.md#conventions).

1. Every image gets the smallest canvas (H, W) that holds it at the largest training scale
   (`data.canvases`, default: landscape and portrait of the largest scale, /32), as mmdet's
   group sampler groups by aspect (`train_canvases`).
2. `plan_epoch(seed, epoch)`: each canvas group is shuffled and filled up to whole global batches
   by repeating its own images, the batches are shuffled, and every slot draws its scale
   (`augment.multiscale`, 'value' or 'range' mode, as mmdet v1 `random_scale`) and flip
   (`augment.flip_ratio`). The plan depends on (seed, epoch) and the examples only, so every
   process computes the same one; the pipeline (pipeline.py) loads its slice of each batch.
"""

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from fcos_jax.data import preprocess
from fcos_jax.data.canvas import assign_canvases, check_canvases, default_canvases

MULTISCALE_MODES = ("value", "range")


# --------------------------------------------------------------------------------------------
# Scales


def check_multiscale(scales: Sequence[Sequence[float]], mode: str) -> list[tuple[int, int]]:
    """augment.multiscale as [(long, short)]; raises ValueError naming the field."""
    if mode not in MULTISCALE_MODES:
        raise ValueError(
            f"augment.multiscale_mode: expected one of {MULTISCALE_MODES}, got {mode!r}"
        )
    out = []
    for s in scales:
        if len(s) != 2 or min(s) < 1:
            raise ValueError(f"augment.multiscale: expected (long, short) pairs, got {scales}")
        out.append((int(max(s)), int(min(s))))
    if not out:
        raise ValueError("augment.multiscale: at least one scale is needed")
    if mode == "range" and len(out) != 2:
        raise ValueError(f"augment.multiscale: 'range' mode needs two scales, got {scales}")
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


# --------------------------------------------------------------------------------------------
# Canvases


def largest_resized_hw(
    original_hw: np.ndarray, scales: Sequence[tuple[int, int]], mode: str, resize_mode: str
) -> np.ndarray:
    """[N, 2] int: per image, the largest resized (h, w) any training scale can give."""
    bound = largest_scales(scales, mode)
    out = np.zeros_like(original_hw, dtype=np.int64)
    for i, (h, w) in enumerate(original_hw.tolist()):
        for scale in bound:
            nh, nw, _ = preprocess.resized_size(h, w, scale, resize_mode)
            out[i] = np.maximum(out[i], (nh, nw))
    return out


def train_canvases(
    original_hw: np.ndarray,
    filenames: Sequence[str],
    scales: Sequence[tuple[int, int]],
    mode: str,
    *,
    resize_mode: str,
    canvases: Sequence[Sequence[int]],
    size_divisor: int,
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The training canvases [(H, W)]: `canvases` (`data.canvases`, checked) or, when empty,
    landscape and portrait of the largest scale rounded up to `size_divisor`; and each image's
    [N] canvas index, the smallest canvas that holds it at every scale of `scales` (`mode`).
    original_hw: [N, 2] (h, w) pixels; filenames [N] name the image that fits none."""
    table = check_canvases(canvases, size_divisor) or default_canvases(scales, size_divisor)
    max_hw = largest_resized_hw(original_hw, scales, mode, resize_mode)
    return table, assign_canvases(max_hw, table, filenames)


# --------------------------------------------------------------------------------------------
# The plan


@dataclasses.dataclass
class EpochPlan:
    """Global batches of one epoch (S steps of B slots).

    examples: [S, B] int64 into Examples; canvas: [S] int index into the canvases;
    scales: [S, B, 2] int64 (long, short) training scale; flips: [S, B] bool."""

    examples: np.ndarray
    canvas: np.ndarray
    scales: np.ndarray
    flips: np.ndarray


def steps_per_epoch(canvas_of: np.ndarray, num_canvases: int, batch_size: int) -> int:
    """Global batches per epoch: each canvas group filled up to whole batches of batch_size."""
    sizes = np.bincount(canvas_of, minlength=num_canvases)
    return int(sum(math.ceil(n / batch_size) for n in sizes))


def plan_epoch(
    canvas_of: np.ndarray,
    num_canvases: int,
    batch_size: int,
    seed: int,
    epoch: int,
    scales: Sequence[tuple[int, int]],
    multiscale_mode: str,
    flip_ratio: float,
) -> EpochPlan:
    """The epoch plan (module docstring, 2): a pure function of its arguments.

    canvas_of: [N] canvas index of every example; batch_size: the global batch size."""
    rng = np.random.default_rng([seed, epoch])
    batches, batch_canvas = [], []
    for c in range(num_canvases):
        members = np.flatnonzero(canvas_of == c)
        if len(members) == 0:
            continue
        order = rng.permutation(members)
        filled = np.resize(order, math.ceil(len(order) / batch_size) * batch_size)
        chunk = filled.reshape(-1, batch_size)
        batches.append(chunk)
        batch_canvas.append(np.full(len(chunk), c, np.int64))
    examples = np.concatenate(batches)
    canvas = np.concatenate(batch_canvas)
    shuffle = rng.permutation(len(examples))
    examples, canvas = examples[shuffle], canvas[shuffle]
    n_slots = examples.size
    sampled = sample_scales(rng, n_slots, scales, multiscale_mode)
    flips = rng.random(n_slots) < flip_ratio
    return EpochPlan(
        examples=examples.astype(np.int64),
        canvas=canvas,
        scales=sampled.reshape(*examples.shape, 2),
        flips=flips.reshape(examples.shape),
    )
