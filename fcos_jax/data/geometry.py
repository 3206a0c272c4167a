"""One example at one input scale (NumPy, no TensorFlow): its ground truth in network-input
pixels, padded to `max_boxes` rows, as mmdet v1 `BboxTransform`: x factors, flip with the
resized width, clip to the resized image (`transform_boxes`) -> padded with `box_valid`
(`pad_boxes`). The resized size and factors are `preprocess.resized_size` and
`preprocess.scale_yx`, the rules `predict` uses.
"""

from collections.abc import Sequence

import numpy as np

from fcos_jax import boxes as box_ops


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
        raise ValueError(f"train.max_boxes: {n} boxes do not fit in {max_boxes} rows")
    out_boxes = np.zeros((max_boxes, 4), np.float32)
    out_labels = np.zeros((max_boxes,), np.int32)
    valid = np.zeros((max_boxes,), bool)
    out_boxes[:n], out_labels[:n], valid[:n] = boxes, labels, True
    return out_boxes, out_labels, valid
