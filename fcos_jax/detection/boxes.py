"""Box algebra: areas, ltrb encode/decode, IoU/GIoU, clipping, flipping, COCO xywh <-> xyxy.

Boxes are `[..., 4]` xyxy in pixels. The legacy `+1` pixel convention of mmdetection v1
(`legacy_plus_one=True`: a box from x1 to x2 covers `x2 - x1 + 1` pixels) lives in this module only;
everything else calls these functions.

Every function works on NumPy arrays (returning NumPy, for the data pipeline and evaluation) and on
JAX arrays (returning JAX arrays, jit/vmap friendly): the array module is taken from the input.
Under jit the results are bit-identical to the NumPy float32 forms (`rounded_product`).
"""

from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # np.ndarray | jax.Array


def _xp(*arrays: Array) -> ModuleType:
    """jax.numpy if any input is a JAX array (or tracer), else numpy."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def plus_one(legacy_plus_one: bool) -> float:
    """The width offset of the pixel convention: 1.0 for mmdet v1, else 0.0."""
    return 1.0 if legacy_plus_one else 0.0


def rounded_product(x: Array, y: Array) -> Array:
    """x * y, rounded to the array's precision before it meets any later addition.

    Under jit, XLA:CPU contracts a product followed by an addition into one fused multiply-add
    (one rounding instead of two), which moves IoUs by an ulp away from NumPy and torchvision's
    CPU kernels. Adding a zero that the compiler cannot prove constant turns any such contraction
    into fma(x, y, 0), the correctly rounded product. NumPy arrays are multiplied plainly."""
    product = x * y
    if _xp(x, y) is np:
        return product
    first = jnp.reshape(product, (-1,))[:1]
    opaque_zero = jnp.sum((first != first).astype(product.dtype)) * 0  # 0 even for NaN
    return product + opaque_zero


def _check_last_dim(name: str, x: Array, size: int) -> None:
    if x.shape[-1] != size:
        raise ValueError(f"{name}: expected last dimension {size}, got shape {tuple(x.shape)}")


def area(boxes: Array, legacy_plus_one: bool = False) -> Array:
    """Box areas. boxes: [..., 4] xyxy, pixels -> [...]. No clipping of negative sizes."""
    _check_last_dim("boxes", boxes, 4)
    o = plus_one(legacy_plus_one)
    return rounded_product(boxes[..., 2] - boxes[..., 0] + o, boxes[..., 3] - boxes[..., 1] + o)


def decode_ltrb(points: Array, ltrb: Array) -> Array:
    """Distances to boxes. points: [..., 2] (x, y); ltrb: [..., 4] (left, top, right, bottom)
    distances, pixels -> [..., 4] xyxy = (x - l, y - t, x + r, y + b). No clipping."""
    _check_last_dim("points", points, 2)
    _check_last_dim("ltrb", ltrb, 4)
    xp = _xp(points, ltrb)
    x, y = points[..., 0], points[..., 1]
    return xp.stack(
        [x - ltrb[..., 0], y - ltrb[..., 1], x + ltrb[..., 2], y + ltrb[..., 3]], axis=-1
    )


def encode_ltrb(points: Array, boxes: Array) -> Array:
    """Boxes to distances. points: [..., 2] (x, y); boxes: [..., 4] xyxy, pixels
    -> [..., 4] (l, t, r, b) = (x - x1, y - y1, x2 - x, y2 - y)."""
    _check_last_dim("points", points, 2)
    _check_last_dim("boxes", boxes, 4)
    xp = _xp(points, boxes)
    x, y = points[..., 0], points[..., 1]
    return xp.stack(
        [x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], axis=-1
    )


def _intersection(a: Array, b: Array, legacy_plus_one: bool) -> Array:
    """Intersection areas of broadcast box pairs: a, b [..., 4] -> [...]."""
    xp = _xp(a, b)
    o = plus_one(legacy_plus_one)
    w = xp.clip(xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0]) + o, 0, None)
    h = xp.clip(xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1]) + o, 0, None)
    return rounded_product(w, h)


def iou_aligned(a: Array, b: Array, legacy_plus_one: bool = False, eps: float = 0.0) -> Array:
    """IoU of box pairs a[i], b[i]. a, b: [..., 4] xyxy, pixels -> [...].

    IoU = inter / (area_a + area_b - inter + eps), with widths `(rb - lt + 1).clip(0)` when
    `legacy_plus_one` (mmdet v1 `bbox_overlaps(is_aligned=True)` has eps 0)."""
    _check_last_dim("a", a, 4)
    _check_last_dim("b", b, 4)
    inter = _intersection(a, b, legacy_plus_one)
    union = area(a, legacy_plus_one) + area(b, legacy_plus_one) - inter
    return inter / (union + eps)


def giou_aligned(a: Array, b: Array, legacy_plus_one: bool = False, eps: float = 0.0) -> Array:
    """Generalized IoU of box pairs. a, b: [..., 4] xyxy, pixels -> [...].

    GIoU = iou - (enclose - union) / (enclose + eps) with iou = inter / (union + eps)
    (torchvision's `generalized_box_iou_loss` form; it uses eps=1e-7)."""
    _check_last_dim("a", a, 4)
    _check_last_dim("b", b, 4)
    xp = _xp(a, b)
    o = plus_one(legacy_plus_one)
    inter = _intersection(a, b, legacy_plus_one)
    union = area(a, legacy_plus_one) + area(b, legacy_plus_one) - inter
    iou = inter / (union + eps)
    enclose_w = xp.maximum(a[..., 2], b[..., 2]) - xp.minimum(a[..., 0], b[..., 0]) + o
    enclose_h = xp.maximum(a[..., 3], b[..., 3]) - xp.minimum(a[..., 1], b[..., 1]) + o
    enclose = rounded_product(enclose_w, enclose_h)
    return iou - (enclose - union) / (enclose + eps)


def iou_matrix(a: Array, b: Array, legacy_plus_one: bool = False) -> Array:
    """Pairwise IoU. a: [N, 4], b: [M, 4] xyxy, pixels -> [N, M].

    inter / (area_a + area_b - inter), widths `(rb - lt + legacy).clip(0)`: the formula of the
    mmdet v1 NMS kernel (+1) and of torchvision/mmcv NMS (no +1). 0/0 gives NaN (never > thr)."""
    _check_last_dim("a", a, 4)
    _check_last_dim("b", b, 4)
    inter = _intersection(a[..., :, None, :], b[..., None, :, :], legacy_plus_one)
    area_a = area(a, legacy_plus_one)[..., :, None]
    area_b = area(b, legacy_plus_one)[..., None, :]
    return inter / (area_a + area_b - inter)


def clip_boxes(boxes: Array, hw: Array, legacy_plus_one: bool = False) -> Array:
    """Clip boxes to an image. boxes: [..., 4] xyxy, pixels; hw: (height, width), an array whose
    leading dimensions broadcast against boxes' (e.g. boxes [B, N, 4] with hw[:, None, :]).

    x to [0, W - 1], y to [0, H - 1] when `legacy_plus_one` (mmdet v1), else [0, W], [0, H]."""
    _check_last_dim("boxes", boxes, 4)
    xp = _xp(boxes, hw)
    hw = xp.asarray(hw)
    _check_last_dim("hw", hw, 2)
    o = plus_one(legacy_plus_one)
    max_x = (hw[..., 1] - o).astype(boxes.dtype)
    max_y = (hw[..., 0] - o).astype(boxes.dtype)
    x1 = xp.clip(boxes[..., 0], 0, max_x)
    y1 = xp.clip(boxes[..., 1], 0, max_y)
    x2 = xp.clip(boxes[..., 2], 0, max_x)
    y2 = xp.clip(boxes[..., 3], 0, max_y)
    return xp.stack([x1, y1, x2, y2], axis=-1)


def flip_horizontal(boxes: Array, width: Array, legacy_plus_one: bool = False) -> Array:
    """Mirror boxes in an image of `width` pixels. boxes: [..., 4] xyxy, pixels.

    x1' = W - x2 - 1, x2' = W - x1 - 1 when `legacy_plus_one` (mmdet v1), else W - x2, W - x1."""
    _check_last_dim("boxes", boxes, 4)
    xp = _xp(boxes, width)
    o = plus_one(legacy_plus_one)
    return xp.stack(
        [width - boxes[..., 2] - o, boxes[..., 1], width - boxes[..., 0] - o, boxes[..., 3]],
        axis=-1,
    )


def coco_xywh_to_xyxy(xywh: Array, legacy_plus_one: bool = False) -> Array:
    """COCO [x, y, w, h] -> [x1, y1, x2, y2].

    x2 = x + w - 1 when `legacy_plus_one`, else x + w."""
    _check_last_dim("xywh", xywh, 4)
    xp = _xp(xywh)
    o = plus_one(legacy_plus_one)
    x, y = xywh[..., 0], xywh[..., 1]
    return xp.stack([x, y, x + xywh[..., 2] - o, y + xywh[..., 3] - o], axis=-1)


def xyxy_to_coco_xywh(boxes: Array, legacy_plus_one: bool = False) -> Array:
    """[x1, y1, x2, y2] -> COCO [x, y, w, h].

    w = x2 - x1 + 1 when `legacy_plus_one`, else x2 - x1."""
    _check_last_dim("boxes", boxes, 4)
    xp = _xp(boxes)
    o = plus_one(legacy_plus_one)
    x1, y1 = boxes[..., 0], boxes[..., 1]
    return xp.stack([x1, y1, boxes[..., 2] - x1 + o, boxes[..., 3] - y1 + o], axis=-1)
