"""The point grid of each FPN level: one (x, y) location per feature-map cell, in input pixels.

mmdetection (every version) puts the point of cell (row i, column j) at (j*s + s//2, i*s + s//2)
(spec 4); torchvision's anchor centres are at (j*s, i*s), without the offset (spec 10).
Points are flattened row-major (y outer, x inner), the order of a `[H, W, C] -> [H*W, C]` reshape.
"""

from collections.abc import Sequence

import numpy as np

# Which family of reference each point convention belongs to, by the names configs use
# (test.postprocess modes and train.assigner values).
_OFFSET_FAMILY = {
    "mmdet": "mmdet",
    "mmdet_v1": "mmdet",
    "mmdet_v3": "mmdet",
    "torchvision": "torchvision",
}


def points_offset(mode: str, stride: int) -> int:
    """Offset of the first point of a level in pixels: stride // 2 for mmdet modes, 0 for
    torchvision. mode: 'mmdet', 'mmdet_v1', 'mmdet_v3' or 'torchvision'."""
    if mode not in _OFFSET_FAMILY:
        raise ValueError(f"mode: expected one of {sorted(_OFFSET_FAMILY)}, got {mode!r}")
    return stride // 2 if _OFFSET_FAMILY[mode] == "mmdet" else 0


def level_points(height: int, width: int, stride: int, offset: int) -> np.ndarray:
    """Points of one level. height, width: feature-map size in cells; stride, offset: pixels.

    Returns [height*width, 2] float32 (x, y) = (j*stride + offset, i*stride + offset), row-major.
    A NumPy constant: inside jit it is folded into the program."""
    if height < 0 or width < 0:
        raise ValueError(f"height, width: expected non-negative sizes, got {height}, {width}")
    xs = np.arange(width, dtype=np.float32) * np.float32(stride) + np.float32(offset)
    ys = np.arange(height, dtype=np.float32) * np.float32(stride) + np.float32(offset)
    grid_x, grid_y = np.meshgrid(xs, ys)  # [H, W] each, y outer
    return np.stack([grid_x.reshape(-1), grid_y.reshape(-1)], axis=-1)


def all_level_points(
    feature_hw: Sequence[tuple[int, int]], strides: Sequence[int], mode: str
) -> list[np.ndarray]:
    """Points of every level. feature_hw: per-level (height, width) in cells; strides: pixels;
    mode: as in `points_offset`. Returns a list of [H_l*W_l, 2] float32 (x, y) arrays."""
    if len(feature_hw) != len(strides):
        raise ValueError(
            f"feature_hw, strides: expected one stride per level, got {len(feature_hw)} levels "
            f"and {len(strides)} strides"
        )
    return [
        level_points(h, w, s, points_offset(mode, s))
        for (h, w), s in zip(feature_hw, strides, strict=True)
    ]
