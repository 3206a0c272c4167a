"""One example at one input scale (NumPy, no TensorFlow): its resized size, the (y, x) factors
from original to input pixels and its ground truth in input pixels, padded to `max_boxes` rows.

The one box path of training slots and evaluation batches, as mmdet v1 `BboxTransform`:
resized size (`preprocess.resized_size`, the rule `predict` uses) -> factors
(`preprocess.scale_yx`) -> x factors, flip with the resized width, clip to the resized image
(`transform_boxes`) -> padded with `box_valid` (`pad_boxes`).
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from fcos_jax.data import preprocess
from fcos_jax.detection import boxes as box_ops


@dataclasses.dataclass(frozen=True)
class Placed:
    """An example placed into the network input (module docstring).

    resized_hw (h, w) int pixels, unpadded; scale_yx (y, x) float: input = original * factor;
    boxes [M, 4] float32 xyxy input pixels, labels [M] int32, box_valid [M] bool (M max_boxes)."""

    resized_hw: tuple[int, int]
    scale_yx: tuple[float, float]
    boxes: np.ndarray
    labels: np.ndarray
    box_valid: np.ndarray


def place(
    boxes: np.ndarray,
    labels: np.ndarray,
    original_hw: tuple[int, int],
    scale: Sequence[float],
    *,
    resize_mode: str,
    single_scale: bool,
    flip: bool,
    max_boxes: int,
    legacy_plus_one: bool,
) -> Placed:
    """boxes [N, 4] float32 xyxy original pixels and labels [N] of an image of original_hw
    (h, w), resized for `scale` (long max, short) in `resize_mode` -> `Placed`. single_scale: the
    mmdet v1 factor convention (`preprocess.scale_yx`); flip: mirrored horizontally."""
    h, w = original_hw
    nh, nw, factor = preprocess.resized_size(h, w, scale, resize_mode)
    factors = preprocess.scale_yx((h, w), (nh, nw), factor, single_scale)
    moved = transform_boxes(boxes, factors, flip, (nh, nw), legacy_plus_one)
    padded, padded_labels, valid = pad_boxes(moved, labels, max_boxes)
    return Placed((nh, nw), factors, padded, padded_labels, valid)


def transform_boxes(
    boxes: np.ndarray,
    scale_yx: Sequence[float],
    flip: bool,
    resized_hw: Sequence[int],
    legacy_plus_one: bool,
) -> np.ndarray:
    """Original-image boxes [N, 4] xyxy -> boxes in the resized (and flipped) image, as mmdet v1
    `BboxTransform`: x * scale, flip with the resized width, clip to the resized image."""
    sy, sx = (np.float32(v) for v in scale_yx)
    scaled = boxes.astype(np.float32) * np.asarray([sx, sy, sx, sy], np.float32)
    if flip:
        scaled = box_ops.flip_horizontal(scaled, np.float32(resized_hw[1]), legacy_plus_one)
    return box_ops.clip_boxes(scaled, np.asarray(resized_hw), legacy_plus_one).astype(np.float32)


def pad_boxes(
    boxes: np.ndarray, labels: np.ndarray, max_boxes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """boxes [N, 4], labels [N] with N <= max_boxes -> boxes [M, 4] float32, labels [M] int32,
    box_valid [M] bool, M = max_boxes; padding rows are zero and invalid."""
    n = len(boxes)
    if n > max_boxes:
        raise ValueError(f"data.max_boxes: {n} boxes do not fit in {max_boxes} rows")
    out_boxes = np.zeros((max_boxes, 4), np.float32)
    out_labels = np.zeros((max_boxes,), np.int32)
    valid = np.zeros((max_boxes,), bool)
    out_boxes[:n], out_labels[:n], valid[:n] = boxes, labels, True
    return out_boxes, out_labels, valid
