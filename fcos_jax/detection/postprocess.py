"""Test-time post-processing: head outputs -> at most `max_per_img` detections per image.

Three named modes (docs/modes.md, NMS in §5), each exactly its reference's test path:
  mmdet_v1     §2.5: per level top-`nms_pre` POINTS by max_c(cls*ctr); decode with mmdet points,
               clamp to [0, w-1] x [0, h-1]; divide by the scale; candidates (point, class) with raw
               cls > score_thr; score cls*ctr; class-aware NMS with +1 widths; top max_per_img.
  mmdet_v3     §3.5: per level raw cls > score_thr, top-`nms_pre` (point, class) PAIRS by raw
               cls; decode, clip to [0, w] x [0, h]; rescale per axis; drop boxes with w <= 0 or
               h <= 0; score cls*ctr; class-aware NMS (no +1); first max_per_img.
  torchvision  §4.5: per level sqrt(cls*ctr) > score_thr, top-`nms_pre` pairs by that score;
               decode with torchvision's anchor centres (no offset, steps of input // feature
               size: points.py), clip to [0, w] x [0, h]; class-aware NMS (no +1); first
               max_per_img; rescale per axis.

Candidates are ordered (level, then point in row-major order, then class): score ties in the
NMS go to the lower of these. The NMS itself is `nms.greedy_nms` (exact greedy, class-aware, with
mmcv's and torchvision's label shift and threshold comparisons, bit for bit); here it is given
each mode's +1 convention (`modes.LEGACY_PLUS_ONE`), threshold comparison and shift.
torchvision's rescale by float32(original / resized) is reproduced when original_hw is given.
"""

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fcos_jax.config import modes
from fcos_jax.detection import boxes as box_ops
from fcos_jax.detection import nms
from fcos_jax.detection.points import all_level_points

MODES = modes.POSTPROCESS_MODES
_LEVEL_KEYS = ("cls_logits", "bbox_reg", "centerness")


def _level_probabilities(
    level: Mapping[str, jax.Array],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One image's level dict -> cls sigmoid [HW, K], ltrb [HW, 4], centerness sigmoid [HW]."""
    height, width, num_classes = level["cls_logits"].shape
    cls_logits = level["cls_logits"].astype(jnp.float32).reshape(height * width, num_classes)
    ltrb = level["bbox_reg"].astype(jnp.float32).reshape(height * width, 4)
    ctr_logits = level["centerness"].astype(jnp.float32).reshape(height * width)
    return jax.nn.sigmoid(cls_logits), ltrb, jax.nn.sigmoid(ctr_logits)


def _concatenated(
    table: jax.Array,
    box_index: list[jax.Array],
    scores: list[jax.Array],
    labels: list[jax.Array],
    valid: list[jax.Array],
) -> nms.Candidates:
    """The candidates of all levels, concatenated in level order."""
    return nms.Candidates(
        table,
        jnp.concatenate(box_index).astype(jnp.int32),
        jnp.concatenate(scores),
        jnp.concatenate(labels).astype(jnp.int32),
        jnp.concatenate(valid),
    )


def _point_grids(
    levels: Sequence[Mapping[str, jax.Array]], strides: Sequence[int], mode: str
) -> list[jax.Array]:
    """Per-level [H*W, 2] (x, y) points of the mode's reference (points.py). torchvision's grid
    depends on the padded input size, taken as the first level's size times its stride."""
    feature_hw = [tuple(level["cls_logits"].shape[:2]) for level in levels]
    return [jnp.asarray(p) for p in all_level_points(feature_hw, strides, mode)]


def _per_axis(factors_yx: jax.Array) -> jax.Array:
    """(y, x) factors -> [4] (x, y, x, y) to multiply or divide xyxy boxes with."""
    return jnp.stack([factors_yx[1], factors_yx[0], factors_yx[1], factors_yx[0]])


def _divide_boxes(boxes: jax.Array, divisor: jax.Array) -> jax.Array:
    """boxes [N, 4] / divisor [4], as true IEEE divisions like the references do.

    Without the barrier XLA rewrites the division by a broadcast row into a multiplication by
    its reciprocal, which is 1 ulp off for some values."""
    return boxes / lax.optimization_barrier(jnp.broadcast_to(divisor, boxes.shape))


def _top_pairs(pair_key: jax.Array, k: int, sort_top_k: bool) -> jax.Array:
    """Flat (point*K + class) indices of the top-k keys, ties to the lower index, returned in
    ascending index order (so candidate order stays (point, class))."""
    return jnp.sort(nms.top_k_indices(pair_key, k, sort_top_k))


def _mmdet_v1_candidates(
    levels: Sequence[Mapping[str, jax.Array]],
    image_hw: jax.Array,
    scale: jax.Array,
    strides: Sequence[int],
    nms_pre: int,
    score_thr: float,
    sort_top_k: bool,
) -> nms.Candidates:
    box_table, box_index, scores, labels, valid = [], [], [], [], []
    rows_so_far = 0
    for level, points in zip(levels, _point_grids(levels, strides, "mmdet_v1"), strict=True):
        cls, ltrb, ctr = _level_probabilities(level)
        num_points, num_classes = cls.shape
        if num_points > nms_pre:
            point_score = jnp.max(cls * ctr[:, None], axis=1)
            keep = jnp.sort(nms.top_k_indices(point_score, nms_pre, sort_top_k))
            cls, ctr, ltrb, points = cls[keep], ctr[keep], ltrb[keep], points[keep]
            num_points = nms_pre
        level_boxes = box_ops.decode_ltrb(points, ltrb)
        box_table.append(
            box_ops.clip_boxes(level_boxes, image_hw, modes.LEGACY_PLUS_ONE["mmdet_v1"])
        )
        box_index.append(rows_so_far + jnp.repeat(jnp.arange(num_points), num_classes))
        scores.append((cls * ctr[:, None]).reshape(-1))
        labels.append(jnp.tile(jnp.arange(num_classes), num_points))
        valid.append((cls > score_thr).reshape(-1))
        rows_so_far += num_points
    table = _divide_boxes(jnp.concatenate(box_table), _per_axis(scale))
    return _concatenated(table, box_index, scores, labels, valid)


def _pair_candidates(
    levels: Sequence[Mapping[str, jax.Array]],
    image_hw: jax.Array,
    strides: Sequence[int],
    nms_pre: int,
    score_thr: float,
    mode: str,
    sort_top_k: bool,
) -> nms.Candidates:
    """Per level: threshold the selection score of each (point, class) pair, keep the top nms_pre
    pairs by it, decode and clip to [0, w] x [0, h] (no +1). mmdet_v3 selects by raw cls and
    scores cls*ctr; torchvision selects and scores by sqrt(cls*ctr)."""
    boxes, scores, labels, valid = [], [], [], []
    for level, points in zip(levels, _point_grids(levels, strides, mode), strict=True):
        cls, ltrb, ctr = _level_probabilities(level)
        num_points, num_classes = cls.shape
        if mode == "torchvision":
            select = jnp.sqrt(cls * ctr[:, None]).reshape(-1)
        else:
            select = cls.reshape(-1)
        passes = select > score_thr
        pairs = _top_pairs(
            jnp.where(passes, select, -jnp.inf), min(nms_pre, select.shape[0]), sort_top_k
        )
        # Truncating division and a product, not // and %: the same for these non-negative
        # indices, and jax2onnx cannot convert an integer remainder with a symbolic batch.
        point = lax.div(pairs, jnp.int32(num_classes))
        label = pairs - point * num_classes
        if mode == "torchvision":
            pair_score = select[pairs]
        else:
            pair_score = select[pairs] * ctr[point]
        level_boxes = box_ops.decode_ltrb(points[point], ltrb[point])
        boxes.append(box_ops.clip_boxes(level_boxes, image_hw, modes.LEGACY_PLUS_ONE[mode]))
        scores.append(pair_score)
        labels.append(label)
        valid.append(passes[pairs])
    all_boxes = jnp.concatenate(boxes)
    box_index = [jnp.arange(all_boxes.shape[0], dtype=jnp.int32)]  # one box per pair
    return _concatenated(all_boxes, box_index, scores, labels, valid)


def _detect_single(
    levels: Sequence[Mapping[str, jax.Array]],
    image_hw: jax.Array,
    scale: jax.Array,
    original_hw: jax.Array | None,
    *,
    mode: str,
    strides: tuple[int, ...],
    nms_pre: int,
    score_thr: float,
    nms_iou: float,
    max_per_img: int,
    chunk_size: int,
    page_size: int,
    batched_nms_device: str,
    sort_top_k: bool,
) -> dict[str, jax.Array]:
    image_hw = image_hw.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    if mode == "mmdet_v1":
        cands = _mmdet_v1_candidates(
            levels, image_hw, scale, strides, nms_pre, score_thr, sort_top_k
        )
    else:
        cands = _pair_candidates(levels, image_hw, strides, nms_pre, score_thr, mode, sort_top_k)
    if mode == "mmdet_v3":
        # mmdet v3 rescales before NMS by multiplying with 1/scale_factor (= original / resized),
        # then drops empty boxes.
        if original_hw is None:
            factors = 1.0 / scale
        else:
            factors = original_hw.astype(jnp.float32) / image_hw
        table = cands.box_table * _per_axis(factors)
        nonempty = (table[:, 2] - table[:, 0] > 0) & (table[:, 3] - table[:, 1] > 0)
        cands = cands._replace(box_table=table, valid=cands.valid & nonempty)
    if mode == "mmdet_v3":  # mmcv's batched_nms always shifts by label
        nms_cands = nms.shift_by_label(cands, None)
    elif mode == "torchvision" and nms.BATCHED_NMS_SHIFT_LIMITS[batched_nms_device] > 0:
        nms_cands = nms.shift_by_label(cands, nms.BATCHED_NMS_SHIFT_LIMITS[batched_nms_device])
    else:  # mmdet v1: one exact NMS per class
        nms_cands = cands
    threshold = nms.float32_threshold(nms_iou, compare_as_float64=mode == "torchvision")
    kept_idx, num_kept = nms.greedy_nms(
        nms_cands,
        threshold,
        modes.LEGACY_PLUS_ONE[mode],
        max_per_img,
        chunk_size,
        page_size,
        sort_top_k,
    )
    valid = jnp.arange(max_per_img) < num_kept
    det_boxes = cands.box_table[cands.box_index[kept_idx]]
    if mode == "torchvision":
        # torchvision rescales after NMS: box * (original / resized) per axis.
        if original_hw is None:
            det_boxes = _divide_boxes(det_boxes, _per_axis(scale))
        else:
            det_boxes = det_boxes * _per_axis(original_hw.astype(jnp.float32) / image_hw)
    return {
        "boxes": jnp.where(valid[:, None], det_boxes, 0.0),
        "scores": jnp.where(valid, cands.scores[kept_idx], 0.0),
        "labels": jnp.where(valid, cands.labels[kept_idx], 0),
        "valid": valid,
    }


@functools.partial(
    jax.jit,
    static_argnames=(
        "mode",
        "strides",
        "nms_pre",
        "score_thr",
        "nms_iou",
        "max_per_img",
        "chunk_size",
        "page_size",
        "batched_nms_device",
        "sort_top_k",
    ),
)
def _detect_jit(head_outputs, image_hw, scale, original_hw, **static):
    single = functools.partial(_detect_single, **static)
    return jax.vmap(single)(head_outputs, image_hw, scale, original_hw)


def detect(
    head_outputs: Sequence[Mapping[str, jax.Array]],
    image_hw: jax.Array,
    scale: jax.Array,
    *,
    mode: str,
    strides: Sequence[int],
    nms_pre: int = 1000,
    score_thr: float,
    nms_iou: float,
    max_per_img: int = 100,
    original_hw: jax.Array | None = None,
    chunk_size: int = 64,
    page_size: int = 2048,
    batched_nms_device: str = "cpu",
    sort_top_k: bool = False,
) -> dict[str, jax.Array]:
    """Detections of a batch (jitted, fixed shapes).

    head_outputs: per level {"cls_logits": [B, H, W, K] logits, "bbox_reg": [B, H, W, 4] ltrb
      distances in input pixels, "centerness": [B, H, W, 1] logits}.
    image_hw: [B, 2] int (height, width) of the resized, unpadded image.
    scale: [B, 2] float (y, x) resize factors; original pixels = resized pixels / scale.
    original_hw: optional [B, 2] int original (height, width). When given, `torchvision` mode
      rescales by float32(original / resized) exactly as torchvision does, and `mmdet_v3` by the
      same factor (v3 multiplies by 1 / scale_factor = original / resized computed in double);
      otherwise both use the scale. `mmdet_v1` always divides by the scale.
    mode: 'mmdet_v1', 'mmdet_v3' or 'torchvision' (module docstring).
    batched_nms_device: torchvision mode only: 'cpu' or 'cuda' reproduce torchvision's
      batched_nms on that device bit for bit (its label-shift trick up to 1000 / 25000 boxes);
      'exact' always compares unshifted boxes.
    chunk_size, page_size: how many candidates the NMS loop resolves per step and orders per
      top-k (speed only, never the result).
    sort_top_k: order candidates with full stable sorts instead of `lax.top_k` (same result,
      slower; for runtimes that cannot read `chlo.top_k`, see `nms.top_k_indices`).

    Returns dict with D = max_per_img rows per image, sorted by score descending, invalid rows 0:
      boxes [B, D, 4] float32 xyxy in original image pixels, scores [B, D] float32,
      labels [B, D] int32 class channel, valid [B, D] bool.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if batched_nms_device not in nms.BATCHED_NMS_SHIFT_LIMITS:
        raise ValueError(
            f"batched_nms_device: expected one of {sorted(nms.BATCHED_NMS_SHIFT_LIMITS)}, "
            f"got {batched_nms_device!r}"
        )
    strides = tuple(int(s) for s in strides)
    if len(head_outputs) != len(strides):
        raise ValueError(
            f"head_outputs: expected one level per stride ({len(strides)}), got {len(head_outputs)}"
        )
    for i, level in enumerate(head_outputs):
        missing = [k for k in _LEVEL_KEYS if k not in level]
        if missing:
            raise ValueError(f"head_outputs[{i}]: missing keys {missing}")
        b, h, w, _ = level["cls_logits"].shape
        if level["bbox_reg"].shape != (b, h, w, 4) or level["centerness"].shape != (b, h, w, 1):
            raise ValueError(
                f"head_outputs[{i}]: bbox_reg {level['bbox_reg'].shape} and centerness "
                f"{level['centerness'].shape} must be [B, H, W, 4] and [B, H, W, 1] with "
                f"cls_logits {level['cls_logits'].shape}"
            )
    batch = head_outputs[0]["cls_logits"].shape[0]
    for name, arr in (("image_hw", image_hw), ("scale", scale), ("original_hw", original_hw)):
        if arr is not None and tuple(arr.shape) != (batch, 2):
            raise ValueError(f"{name}: expected shape ({batch}, 2), got {tuple(arr.shape)}")
    for name, value in (
        ("nms_pre", nms_pre),
        ("max_per_img", max_per_img),
        ("chunk_size", chunk_size),
        ("page_size", page_size),
    ):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    levels = [{k: level[k] for k in _LEVEL_KEYS} for level in head_outputs]
    return _detect_jit(
        levels,
        jnp.asarray(image_hw),
        jnp.asarray(scale),
        None if original_hw is None else jnp.asarray(original_hw),
        mode=mode,
        strides=strides,
        nms_pre=int(nms_pre),
        score_thr=float(score_thr),
        nms_iou=float(nms_iou),
        max_per_img=int(max_per_img),
        chunk_size=int(chunk_size),
        page_size=int(page_size),
        batched_nms_device=batched_nms_device,
        sort_top_k=bool(sort_top_k),
    )


def options_from_config(config: Any) -> dict[str, Any]:
    """`detect` keyword arguments of a config (`test.*` and the head's strides)."""
    test = config.test
    if test.postprocess not in MODES:
        raise ValueError(f"test.postprocess: expected one of {MODES}, got {test.postprocess!r}")
    return dict(
        mode=test.postprocess,
        strides=tuple(int(s) for s in config.model.head.strides),
        nms_pre=int(test.nms_pre),
        score_thr=float(test.score_thr),
        nms_iou=float(test.nms_iou),
        max_per_img=int(test.max_per_img),
    )
