"""The evaluation plan (NumPy, no TensorFlow): every image of the split once, in index order,
grouped by padded shape, in global batches whose last one per shape is filled with dummies.

The padded shape is the next multiple of `preprocess.size_divisor` of the resized size, as
`predict` pads (`data.eval_pad='canvas'`: the landscape or portrait canvas of the test scale
instead, `canvas.eval_canvases`).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from fcos_jax.data import preprocess
from fcos_jax.data.canvas import assign_canvases, round_up
from fcos_jax.data.examples import Examples


@dataclasses.dataclass
class EvalStep:
    """One global evaluation batch: rows [B] int64 into Examples (-1: a dummy), padded (H, W)."""

    rows: np.ndarray
    padded_hw: tuple[int, int]


def plan_evaluation(
    examples: Examples,
    config: Any,
    batch_size: int,
    canvases: Sequence[tuple[int, int]] | None = None,
) -> list[EvalStep]:
    """Global evaluation batches: images grouped by padded shape (first appearance order), each
    group cut into batches of `batch_size`, the last one filled with dummies (-1). An image that
    resizes to nothing is an error naming its file (evaluation cannot leave an image out)."""
    p = config.preprocess
    divisor = int(p.size_divisor)
    padded = []
    for hw, name in zip(examples.original_hw.tolist(), examples.filenames, strict=True):
        nh, nw = preprocess.checked_resized_size(hw, p, str(name))
        padded.append((round_up(nh, divisor), round_up(nw, divisor)))
    padded = np.asarray(padded, np.int64).reshape(-1, 2)
    if canvases:
        choice = assign_canvases(padded, canvases, examples.filenames)
        padded = np.asarray(canvases, np.int64)[choice]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(padded.tolist()):
        groups.setdefault(tuple(hw), []).append(i)
    steps = []
    for hw, members in groups.items():
        for start in range(0, len(members), batch_size):
            rows = np.full(batch_size, -1, np.int64)
            chunk = members[start : start + batch_size]
            rows[: len(chunk)] = chunk
            steps.append(EvalStep(rows=rows, padded_hw=hw))
    return steps
