"""Training transforms (docs/modes.md §2.7, §4.7): ground truth in NumPy (through boxes.py),
pixels in TF ops.

Order, as mmdet v1 `CustomDataset.prepare_train_img` + `ImageTransform`/`BboxTransform`:
  decode (RGB or BGR per config) -> keep-ratio resize to a planned size -> (mmdet: round to uint8
  as cv2 does) -> normalise -> horizontal flip -> zero pad bottom/right into the canvas.
  boxes: COCO xywh -> xyxy (boxes.coco_xywh_to_xyxy), crowd dropped, clipped to the image, w or h
  < 1 dropped (all once, when the index is built: `clean_annotations`); per example x scale,
  flip (boxes.flip_horizontal with the resized width), clip to the resized image; padded to
  `max_boxes` rows with `box_valid` (more boxes: the largest `max_boxes` are kept).

The random choices (scale, flip) and sizes are made by the epoch plan (pipeline.py) on the host,
so the TF graph only executes them. The evaluation path does not use this module's pixel code:
it calls `fcos_jax.preprocess.preprocess`, the function `predict` uses (pixel-exact cv2 for the
mmdet modes). Here the mmdet mode decodes JPEGs with the accurate integer IDCT (the same pixels as
cv2.imdecode) and resizes with `tf.image.resize` bilinear (half-pixel centres, no antialiasing),
within 1 grey level of cv2 INTER_LINEAR on uint8. The channel swap and the flip are applied to the
decoded image, before the resize: bilinear sampling with half-pixel centres is mirror-symmetric,
so this equals mmdet's flip after resize and normalisation, and costs less.
"""

import collections
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from fcos_jax import boxes as box_ops
from fcos_jax import preprocess

log = logging.getLogger(__name__)

MULTISCALE_MODES = ("value", "range")


# --------------------------------------------------------------------------------------------
# Ground truth (NumPy)


def channel_lookup(class_list: Sequence[tuple[int, str]]) -> dict[int, int]:
    """{category id: class channel} of a class list [(category_id, name)] in channel order."""
    lookup: dict[int, int] = {}
    for channel, (category_id, _) in enumerate(class_list):
        lookup.setdefault(int(category_id), channel)
    return lookup


def clean_annotations(
    bbox_xywh: np.ndarray,
    category_ids: np.ndarray,
    is_crowd: np.ndarray,
    original_hw: Sequence[int],
    channel_of: dict[int, int],
    legacy_plus_one: bool,
    counts: collections.Counter,
    where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Usable boxes of one image in original pixels.

    bbox_xywh: [A, 4] COCO boxes, pixels; category_ids [A]; is_crowd [A] bool; original_hw (h, w).
    Crowd boxes are dropped (mmdet v1 `with_crowd=False`), boxes entirely outside the image
    dropped, the others clipped to the image (`boxes.clip_boxes`) and dropped when w or h < 1
    after clipping; each is counted in `counts`. A category id missing from `channel_of` raises
    ValueError naming `where`.
    Returns boxes [N, 4] float32 xyxy and labels [N] int32 class channels."""
    bbox_xywh = np.asarray(bbox_xywh, np.float32).reshape(-1, 4)
    is_crowd = np.asarray(is_crowd, bool)
    category_ids = np.asarray(category_ids, np.int64)
    counts["crowd_boxes_dropped"] += int(is_crowd.sum())
    keep = ~is_crowd
    bbox_xywh, category_ids = bbox_xywh[keep], category_ids[keep]
    unknown = [int(c) for c in category_ids if int(c) not in channel_of]
    if unknown:
        raise ValueError(
            f"{where}: category id {unknown[0]} is not in the class list (data.classes); "
            f"known ids: {sorted(channel_of)[:20]}..."
        )
    labels = np.asarray([channel_of[int(c)] for c in category_ids], np.int32)
    xyxy = box_ops.coco_xywh_to_xyxy(bbox_xywh, legacy_plus_one)
    clipped = box_ops.clip_boxes(xyxy, np.asarray(original_hw), legacy_plus_one)
    # A box entirely outside the image would clip to a sliver on its border.
    h, w = original_hw
    outside = (xyxy[:, 0] >= w) | (xyxy[:, 1] >= h) | (xyxy[:, 2] < 0) | (xyxy[:, 3] < 0)
    counts["boxes_outside_dropped"] += int(outside.sum())
    counts["boxes_clipped"] += int(((clipped != xyxy).any(axis=-1) & ~outside).sum())
    size = box_ops.xyxy_to_coco_xywh(clipped, legacy_plus_one)[:, 2:]
    big_enough = (size >= 1).all(axis=-1)
    counts["small_boxes_dropped"] += int((~big_enough & ~outside).sum())
    keep = big_enough & ~outside
    return clipped[keep].astype(np.float32), labels[keep]


def keep_largest(
    boxes: np.ndarray, labels: np.ndarray, max_boxes: int, legacy_plus_one: bool
) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_boxes` boxes: the largest by area (ties: lower index), in their input order.
    boxes: [N, 4] xyxy, pixels; labels [N]."""
    if len(boxes) <= max_boxes:
        return boxes, labels
    order = np.argsort(-box_ops.area(boxes, legacy_plus_one), kind="stable")
    keep = np.sort(order[:max_boxes])
    return boxes[keep], labels[keep]


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


# --------------------------------------------------------------------------------------------
# Sizes and scales


def resized_size(
    h: int, w: int, scale: Sequence[float], resize_mode: str
) -> tuple[int, int, float]:
    """Keep-ratio size of an h x w image for `scale` (long max, short): the rule of `predict`
    (preprocess.py): mmdet int(x + 0.5), torchvision floor. Returns (new_h, new_w, factor)."""
    if resize_mode == "mmdet":
        return preprocess.mmdet_rescale_size(h, w, scale)
    if resize_mode == "torchvision":
        return preprocess.torchvision_resize_size(h, w, scale)
    raise ValueError(
        f"preprocess.resize: expected one of {preprocess.RESIZE_MODES}, got {resize_mode!r}"
    )


def scale_yx(
    original_hw: Sequence[int], resized_hw: Sequence[int], factor: float, single_scale: bool
) -> tuple[float, float]:
    """(y, x) factors that map original to resized pixels: (factor, factor) for mmdet v1 (one
    float), else (new_h / h, new_w / w) as mmdet v2+ and torchvision (preprocess.py docstring)."""
    if single_scale:
        return factor, factor
    return resized_hw[0] / original_hw[0], resized_hw[1] / original_hw[1]


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


# --------------------------------------------------------------------------------------------
# Pixels (TF)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> [H, W, 3] uint8 RGB. JPEGs use the accurate integer IDCT (libjpeg's
    default, so the pixels equal cv2.imdecode's); PNG/GIF/BMP through tf.io.decode_image."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False),
    )


def train_image(
    encoded: tf.Tensor,
    original_hw: tf.Tensor,
    resized_hw: tf.Tensor,
    flip: tf.Tensor,
    canvas_hw: tf.Tensor,
    preprocess_config: Any,
) -> tf.Tensor:
    """One training image: [Hc, Wc, 3] float32, the resized image at the top left of the canvas.

    encoded: [] string; original_hw, resized_hw, canvas_hw: [2] int32 (h, w); flip: [] bool.
    preprocess_config: `config.preprocess` (resize mode, mean, std, to_rgb, unit_range)."""
    p = preprocess_config
    if p.resize not in preprocess.RESIZE_MODES:
        raise ValueError(
            f"preprocess.resize: expected one of {preprocess.RESIZE_MODES}, got {p.resize!r}"
        )
    if p.resize == "torchvision" and not p.to_rgb:
        raise ValueError("preprocess.to_rgb: the torchvision resize mode expects RGB (True)")
    image = decode_image(encoded)
    tf.debugging.assert_equal(
        tf.shape(image)[:2], original_hw, message="decoded image size differs from the index"
    )
    # Channel order and flip are applied to the small decoded image: bilinear sampling with
    # half-pixel centres is mirror-symmetric, so flipping before the resize equals flipping after.
    if not p.to_rgb:
        image = tf.reverse(image, axis=[-1])  # several times faster than image[..., ::-1]
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)

    def normalise(pixels: tf.Tensor) -> tf.Tensor:
        if p.unit_range:
            pixels = pixels / 255.0
        pixels = pixels - tf.constant(p.mean, tf.float32)
        if any(v != 1 for v in p.std):
            pixels = pixels / tf.constant(p.std, tf.float32)
        return pixels

    if p.resize == "mmdet":
        # cv2 resizes uint8 to uint8: round (a convex combination of 0..255 needs no clipping).
        pixels = tf.round(tf.image.resize(image, resized_hw, method="bilinear", antialias=False))
        pixels = normalise(pixels)
    else:  # torchvision: normalise, then resize the float image
        pixels = normalise(tf.cast(image, tf.float32))
        pixels = tf.image.resize(pixels, resized_hw, method="bilinear", antialias=False)
    pad = canvas_hw - resized_hw
    return tf.pad(pixels, [[0, pad[0]], [0, pad[1]], [0, 0]])
