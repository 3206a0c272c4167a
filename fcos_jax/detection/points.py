"""The point grid of each FPN level: one (x, y) location per feature-map cell, in input pixels.

mmdetection (every version) puts the point of cell (row i, column j) at (j*s + s//2, i*s + s//2)
(docs/modes.md §2.4, §3.4). torchvision's anchor centres are at (j*step_x, i*step_y), without the
offset, where its `AnchorGenerator` steps by `padded_image_size // feature_size` on each axis
(docs/modes.md §4.4): equal to the stride on P3-P5 of an input padded to /32, but not on P6/P7
unless the input is a multiple of 128 (800x1344: P6 steps 64 x 61, P7 122 x 114). The anchor
*size* (the regression unit) stays the nominal stride.
Points are flattened row-major (y outer, x inner), the order of a `[H, W, C] -> [H*W, C]` reshape.
`feature_sizes` gives the levels' (H, W) for an input size: the grid the points are laid on.
"""

from collections.abc import Sequence

import numpy as np

# Which family of reference each point convention belongs to, by the names configs use
# (test.postprocess modes and targets.assigner values).
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


def level_points(
    height: int, width: int, stride: int, offset: int, stride_y: int | None = None
) -> np.ndarray:
    """Points of one level. height, width: feature-map size in cells; stride (x step), offset and
    stride_y (y step, default = stride): pixels.

    Returns [height*width, 2] float32 (x, y) = (j*stride + offset, i*stride_y + offset),
    row-major. A NumPy constant: inside jit it is folded into the program."""
    if height < 0 or width < 0:
        raise ValueError(f"height, width: expected non-negative sizes, got {height}, {width}")
    stride_y = stride if stride_y is None else stride_y
    xs = np.arange(width, dtype=np.float32) * np.float32(stride) + np.float32(offset)
    ys = np.arange(height, dtype=np.float32) * np.float32(stride_y) + np.float32(offset)
    grid_x, grid_y = np.meshgrid(xs, ys)  # [H, W] each, y outer
    return np.stack([grid_x.reshape(-1), grid_y.reshape(-1)], axis=-1)


def all_level_points(
    feature_hw: Sequence[tuple[int, int]], strides: Sequence[int], mode: str
) -> list[np.ndarray]:
    """Points of every level. feature_hw: per-level (height, width) in cells; strides: pixels;
    mode: as in `points_offset`. Returns a list of [H_l*W_l, 2] float32 (x, y) arrays.

    torchvision mode steps by padded_size // feature_size per axis (module docstring); the padded
    input size is that of the first level times its stride."""
    if len(feature_hw) != len(strides):
        raise ValueError(
            f"feature_hw, strides: expected one stride per level, got {len(feature_hw)} levels "
            f"and {len(strides)} strides"
        )
    if mode in _OFFSET_FAMILY and _OFFSET_FAMILY[mode] == "torchvision" and feature_hw:
        image_h, image_w = feature_hw[0][0] * strides[0], feature_hw[0][1] * strides[0]
        return [
            level_points(h, w, image_w // max(w, 1), 0, stride_y=image_h // max(h, 1))
            for h, w in feature_hw
        ]
    return [
        level_points(h, w, s, points_offset(mode, s))
        for (h, w), s in zip(feature_hw, strides, strict=True)
    ]


def feature_sizes(image_hw: tuple[int, int], num_levels: int = 5) -> tuple[tuple[int, int], ...]:
    """Per-level (H, W) of the head outputs for an input of `image_hw` pixels (strides 8..128).

    Every stride-2 layer of the network maps n -> ceil(n / 2).
    """
    h, w = image_hw
    sizes = []
    for level in range(3 + num_levels - 1):
        h, w = -(-h // 2), -(-w // 2)
        if level >= 2:
            sizes.append((h, w))
    return tuple(sizes)
