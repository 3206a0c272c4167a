"""The usable examples of a split (NumPy, no TensorFlow): every box cleaned once, at index time.

Crowd boxes dropped (mmdet v1 `with_crowd=False`), boxes clipped to the image, boxes outside it
or with w or h < 1 dropped, at most `train.max_boxes` kept (the largest); for training, images
left without a box or with a side < `data.min_image_side` are skipped. Everything dropped or
skipped is counted (`Examples.counts`). The ground truth stays in original pixels; the epoch and
evaluation plans place it into the network input per slot (geometry.py).
"""

import collections
from collections.abc import Sequence

import numpy as np

from fcos_jax import boxes as box_ops


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
