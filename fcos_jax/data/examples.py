"""The usable examples of a split (NumPy, no TensorFlow): every box cleaned once, at index time.

Crowd boxes dropped (mmdet v1 `with_crowd=False`), boxes with a negative width or height dropped,
boxes clipped to the image, boxes outside it or with w or h < 1 dropped, at most
`data.max_boxes` kept (the largest); for training, images left without a box or with a side <
`data.min_image_side` are skipped. Everything dropped or skipped is counted (`Examples.counts`),
under the reason that dropped it. The ground truth stays in original pixels; the epoch and
evaluation plans place it into the network input per slot (geometry.py).
"""

import collections
import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from fcos_jax.data import annotations
from fcos_jax.detection import boxes as box_ops

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Examples:
    """Usable examples of a split (N), ground truth in original pixels.

    rows: [N] int64 row in the SplitIndex; positions [N] record position in the source;
    image_ids [N] int64; filenames [N] str; original_hw [N, 2] int32; box_offsets [N + 1]:
    example i owns rows box_offsets[i]:[i + 1] of boxes [B, 4] float32 xyxy and labels [B] int32.
    counts: what was dropped or skipped (module docstring).
    """

    rows: np.ndarray
    positions: np.ndarray
    image_ids: np.ndarray
    filenames: np.ndarray
    original_hw: np.ndarray
    box_offsets: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    counts: dict[str, int]

    def __len__(self) -> int:
        return len(self.rows)

    def ground_truth(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """boxes [n, 4] float32 xyxy original pixels, labels [n] int32 of example i."""
        rows = slice(int(self.box_offsets[i]), int(self.box_offsets[i + 1]))
        return self.boxes[rows], self.labels[rows]


def prepare_examples(
    index: annotations.SplitIndex,
    class_list: Sequence[tuple[int, str]],
    *,
    legacy_plus_one: bool,
    max_boxes: int,
    training: bool,
    min_image_side: int = 0,
    where: str = "dataset",
) -> Examples:
    """Cleans every example's boxes (`clean_annotations`) and keeps at most `max_boxes` (the
    largest); when `training`, drops images without a box or with a side < min_image_side.
    Raises ValueError naming `where` when nothing is left."""
    if max_boxes < 1:
        raise ValueError(f"data.max_boxes: expected >= 1, got {max_boxes}")
    channel_of = channel_lookup(class_list)
    counts: collections.Counter = collections.Counter()
    kept_rows, kept_boxes, kept_labels = [], [], []
    for i in range(len(index)):
        rows = index.annotations(i)
        hw = index.original_hw[i]
        what = f"{where}: image id {int(index.image_ids[i])} ({index.filenames[i]})"
        boxes, labels = clean_annotations(
            index.bbox_xywh[rows],
            index.category_ids[rows],
            index.is_crowd[rows],
            hw,
            channel_of,
            legacy_plus_one,
            counts,
            what,
        )
        if training and min(hw) < min_image_side:
            counts["small_images_skipped"] += 1
            continue
        if training and len(boxes) == 0:
            counts["images_without_boxes_skipped"] += 1
            continue
        if len(boxes) > max_boxes:
            counts["images_over_max_boxes"] += 1
            counts["boxes_over_max_dropped"] += len(boxes) - max_boxes
            boxes, labels = keep_largest(boxes, labels, max_boxes, legacy_plus_one)
        kept_rows.append(i)
        kept_boxes.append(boxes)
        kept_labels.append(labels)
    if not kept_rows:
        raise ValueError(f"{where}: no usable images ({dict(counts)})")
    if counts["images_over_max_boxes"]:
        log.warning(
            "%s: %d images have more than max_boxes=%d boxes; %d smallest boxes dropped",
            where,
            counts["images_over_max_boxes"],
            max_boxes,
            counts["boxes_over_max_dropped"],
        )
    skipped = counts["images_without_boxes_skipped"] + counts["small_images_skipped"]
    if skipped:
        log.info("%s: %d images skipped for training (%s)", where, skipped, dict(counts))
    rows = np.asarray(kept_rows, np.int64)
    offsets = np.zeros(len(rows) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in kept_boxes])
    return Examples(
        rows=rows,
        positions=index.positions[rows],
        image_ids=index.image_ids[rows],
        filenames=index.filenames[rows],
        original_hw=index.original_hw[rows],
        box_offsets=offsets,
        boxes=np.concatenate(kept_boxes).reshape(-1, 4).astype(np.float32),
        labels=np.concatenate(kept_labels).astype(np.int32),
        counts=dict(counts),
    )


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
    Crowd boxes are dropped (mmdet v1 `with_crowd=False`), boxes with a negative w or h
    dropped, boxes entirely outside the image dropped, the others clipped to the image
    (`boxes.clip_boxes`) and dropped when w or h < 1 after clipping; each is counted in `counts`
    under the first of these reasons that drops it. A category id missing from `channel_of` raises
    ValueError naming `where`.
    Returns boxes [N, 4] float32 xyxy and labels [N] int32 class channels."""
    bbox_xywh = np.asarray(bbox_xywh, np.float32).reshape(-1, 4)
    is_crowd = np.asarray(is_crowd, bool)
    category_ids = np.asarray(category_ids, np.int64)
    _count(counts, "crowd_boxes_dropped", is_crowd)
    keep = ~is_crowd
    bbox_xywh, category_ids = bbox_xywh[keep], category_ids[keep]
    unknown = [int(c) for c in category_ids if int(c) not in channel_of]
    if unknown:
        raise ValueError(
            f"{where}: category id {unknown[0]} is not in the class list (data.classes); "
            f"known ids: {sorted(channel_of)[:20]}..."
        )
    labels = np.asarray([channel_of[int(c)] for c in category_ids], np.int32)
    # A negative width or height is a malformed box, not a small or misplaced one.
    negative = (bbox_xywh[:, 2:] < 0).any(axis=-1)
    _count(counts, "boxes_negative_size_dropped", negative)
    bbox_xywh, labels = bbox_xywh[~negative], labels[~negative]
    xyxy = box_ops.coco_xywh_to_xyxy(bbox_xywh, legacy_plus_one)
    clipped = box_ops.clip_boxes(xyxy, np.asarray(original_hw), legacy_plus_one)
    # A box entirely outside the image would clip to a sliver on its border.
    h, w = original_hw
    outside = (xyxy[:, 0] >= w) | (xyxy[:, 1] >= h) | (xyxy[:, 2] < 0) | (xyxy[:, 3] < 0)
    _count(counts, "boxes_outside_dropped", outside)
    _count(counts, "boxes_clipped", (clipped != xyxy).any(axis=-1) & ~outside)
    size = box_ops.xyxy_to_coco_xywh(clipped, legacy_plus_one)[:, 2:]
    big_enough = (size >= 1).all(axis=-1)
    _count(counts, "small_boxes_dropped", ~big_enough & ~outside)
    keep = big_enough & ~outside
    return clipped[keep].astype(np.float32), labels[keep]


def _count(counts: collections.Counter, reason: str, mask: np.ndarray) -> None:
    """Adds the number of True entries of `mask` to `counts[reason]` (no entry for none)."""
    if mask.any():
        counts[reason] += int(mask.sum())


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
