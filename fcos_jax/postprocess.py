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

mmcv's (v3) and torchvision's batched_nms compute IoUs on boxes shifted by label * (max
coordinate + 1); that is reproduced bit for bit (`_shift_by_label`), as are the float32 or double
threshold comparisons and torchvision's rescale by float32(original / resized) when given.

NMS is exact sequential greedy NMS (a box is suppressed by a kept box of the same class with
IoU > nms_iou, strictly), run over all candidates in descending score order with ties broken by
the lower candidate index (level, then point in row-major order, then class), stopping once
max_per_img boxes are kept. It runs in fixed shapes: the candidate order comes in pages from
`lax.top_k` (no full sort), then a `lax.while_loop` takes chunks of each page,
drops those suppressed by already kept boxes, resolves the chunk's own greedy order by a
fixed-point iteration, and appends the survivors.
"""

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fcos_jax import boxes as box_ops
from fcos_jax.points import all_level_points

MODES = ("mmdet_v1", "mmdet_v3", "torchvision")
# torchvision.ops.batched_nms runs one NMS over boxes shifted by label * (max coordinate + 1)
# when it has at most this many boxes (4000 coordinates on CPU, 100000 on CUDA), else an exact
# NMS per class; the shift's float32 rounding can move an IoU by ~1e-4. "exact": never shift.
BATCHED_NMS_SHIFT_LIMITS = {"cpu": 1000, "cuda": 25_000, "exact": 0}
_LEVEL_KEYS = ("cls_logits", "bbox_reg", "centerness")


class _Candidates(NamedTuple):
    """Detection candidates of one image, in (level, point, class) order.

    box_table: [T, 4] xyxy boxes, pixels; box_index: [N] int32 row of box_table of each candidate
    (mmdet_v1 shares one box between the classes of a point); scores: [N] float32;
    labels: [N] int32 class channel; valid: [N] bool."""

    box_table: jax.Array
    box_index: jax.Array
    scores: jax.Array
    labels: jax.Array
    valid: jax.Array


def _flatten_level(level: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One image's level dict -> cls logits [HW, K], ltrb [HW, 4], centerness logits [HW]."""
    height, width, num_classes = level["cls_logits"].shape
    cls_logits = level["cls_logits"].astype(jnp.float32).reshape(height * width, num_classes)
    ltrb = level["bbox_reg"].astype(jnp.float32).reshape(height * width, 4)
    ctr_logits = level["centerness"].astype(jnp.float32).reshape(height * width)
    return cls_logits, ltrb, ctr_logits


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


def _float32_threshold(threshold: float, compare_as_float64: bool) -> float:
    """The float32 t such that `iou_f32 > t` equals the reference's comparison.

    mmdet/mmcv kernels take the threshold as a C float (round to nearest float32); torchvision's
    takes a double and compares the float32 IoU promoted to double, which equals comparing with
    the largest float32 not above the threshold."""
    t = np.float32(threshold)
    if compare_as_float64 and float(t) > threshold:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


def _divide_boxes(boxes: jax.Array, divisor: jax.Array) -> jax.Array:
    """boxes [N, 4] / divisor [4], as true IEEE divisions like the references do.

    Without the barrier XLA rewrites the division by a broadcast row into a multiplication by
    its reciprocal, which is 1 ulp off for some values."""
    return boxes / lax.optimization_barrier(jnp.broadcast_to(divisor, boxes.shape))


def _top_k_indices(key: jax.Array, k: int, sort_top_k: bool) -> jax.Array:
    """Indices [k] of the k largest entries of key [N], largest first, ties to the lower index.

    The optimization barrier keeps XLA from folding later slices of the result into the sort
    that top_k is written as; when that happens XLA:CPU no longer recognises the top-k and runs
    a full sort (about 30x slower for 270k entries). `sort_top_k`: take the same indices from a
    full stable sort instead of `lax.top_k`, for runtimes that cannot read `chlo.top_k` (TF
    2.21's reader of the StableHLO that jax 0.10 writes)."""
    if sort_top_k:
        index = jnp.arange(key.shape[0], dtype=jnp.int32)
        return lax.sort((-key, index), num_keys=1, is_stable=True)[1][:k]
    return lax.optimization_barrier(lax.top_k(key, k)[1])


def _top_pairs(pair_key: jax.Array, k: int, sort_top_k: bool) -> jax.Array:
    """Flat (point*K + class) indices of the top-k keys, ties to the lower index, returned in
    ascending index order (so candidate order stays (point, class))."""
    return jnp.sort(_top_k_indices(pair_key, k, sort_top_k))


def _mmdet_v1_candidates(
    levels: Sequence[Mapping[str, jax.Array]],
    image_hw: jax.Array,
    scale: jax.Array,
    strides: Sequence[int],
    nms_pre: int,
    score_thr: float,
    sort_top_k: bool,
) -> _Candidates:
    box_table, box_index, scores, labels, valid = [], [], [], [], []
    rows_so_far = 0
    for level, points in zip(levels, _point_grids(levels, strides, "mmdet_v1"), strict=True):
        cls_logits, ltrb, ctr_logits = _flatten_level(level)
        cls = jax.nn.sigmoid(cls_logits)
        ctr = jax.nn.sigmoid(ctr_logits)
        num_points, num_classes = cls.shape
        if num_points > nms_pre:
            point_score = jnp.max(cls * ctr[:, None], axis=1)
            keep = jnp.sort(_top_k_indices(point_score, nms_pre, sort_top_k))
            cls, ctr, ltrb, points = cls[keep], ctr[keep], ltrb[keep], points[keep]
            num_points = nms_pre
        level_boxes = box_ops.decode_ltrb(points, ltrb)
        box_table.append(box_ops.clip_boxes(level_boxes, image_hw, legacy_plus_one=True))
        box_index.append(rows_so_far + jnp.repeat(jnp.arange(num_points), num_classes))
        scores.append((cls * ctr[:, None]).reshape(-1))
        labels.append(jnp.tile(jnp.arange(num_classes), num_points))
        valid.append((cls > score_thr).reshape(-1))
        rows_so_far += num_points
    table = _divide_boxes(jnp.concatenate(box_table), _per_axis(scale))
    return _Candidates(
        table,
        jnp.concatenate(box_index).astype(jnp.int32),
        jnp.concatenate(scores),
        jnp.concatenate(labels).astype(jnp.int32),
        jnp.concatenate(valid),
    )


def _pair_candidates(
    levels: Sequence[Mapping[str, jax.Array]],
    image_hw: jax.Array,
    strides: Sequence[int],
    nms_pre: int,
    score_thr: float,
    mode: str,
    sort_top_k: bool,
) -> _Candidates:
    """Per level: threshold the selection score of each (point, class) pair, keep the top nms_pre
    pairs by it, decode and clip to [0, w] x [0, h] (no +1). mmdet_v3 selects by raw cls and
    scores cls*ctr; torchvision selects and scores by sqrt(cls*ctr)."""
    boxes, scores, labels, valid = [], [], [], []
    for level, points in zip(levels, _point_grids(levels, strides, mode), strict=True):
        cls_logits, ltrb, ctr_logits = _flatten_level(level)
        cls = jax.nn.sigmoid(cls_logits)
        ctr = jax.nn.sigmoid(ctr_logits)
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
        boxes.append(box_ops.clip_boxes(level_boxes, image_hw, legacy_plus_one=False))
        scores.append(pair_score)
        labels.append(label)
        valid.append(passes[pairs])
    all_boxes = jnp.concatenate(boxes)
    return _Candidates(
        all_boxes,
        jnp.arange(all_boxes.shape[0], dtype=jnp.int32),
        jnp.concatenate(scores),
        jnp.concatenate(labels).astype(jnp.int32),
        jnp.concatenate(valid),
    )


def _shift_by_label(cands: _Candidates, limit: int | None) -> _Candidates:
    """The candidates with boxes shifted by label * (max valid coordinate + 1) in float32, as
    torchvision's and mmcv's `batched_nms` do before one class-agnostic NMS, when at most `limit`
    are valid (None: always). Needs one box per candidate (box_index = arange)."""
    num_valid = jnp.sum(cands.valid.astype(jnp.int32))
    valid_coords = jnp.where(cands.valid[:, None], cands.box_table, -jnp.inf)
    max_coord = jnp.where(num_valid > 0, jnp.max(valid_coords), 0.0)
    offsets = box_ops.rounded_product(cands.labels.astype(jnp.float32), max_coord + 1.0)
    shifted = cands.box_table + offsets[:, None]
    if limit is not None:
        shifted = jnp.where(num_valid <= limit, shifted, cands.box_table)
    return cands._replace(box_table=shifted)


def _greedy_nms(
    cands: _Candidates,
    iou_thr: float,
    legacy_plus_one: bool,
    max_det: int,
    chunk_size: int,
    page_size: int,
    sort_top_k: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Exact class-aware greedy NMS of one image's candidates.

    Candidates are visited in descending score order, ties by lower index. Sorting all of them
    is slow (mmdet_v1 has ~270k at 800x1344), so the order comes in pages of `page_size` from
    `lax.top_k` (ties to the lower index) over the candidates not visited yet, and each page is
    walked in chunks of `chunk_size`. One page usually fills max_det.

    Returns kept candidate indices [max_det] int32 in visiting order and the number kept (scalar
    int32); rows past the count are 0."""
    num_cands = cands.scores.shape[0]
    page = max(1, min(page_size, num_cands))
    chunk = max(1, min(chunk_size, page))
    select_key = jnp.where(cands.valid, cands.scores, -jnp.inf)
    cand_index = jnp.arange(num_cands, dtype=jnp.int32)
    num_valid = jnp.sum(cands.valid.astype(jnp.int32))
    in_chunk = jnp.arange(chunk)
    later_in_chunk = in_chunk[None, :] > in_chunk[:, None]  # [i, j]: j comes after i
    slots = jnp.arange(max_det)

    def overlaps(boxes_a, labels_a, boxes_b, labels_b):
        iou = box_ops.iou_matrix(boxes_a, boxes_b, legacy_plus_one)
        return (iou > iou_thr) & (labels_a[:, None] == labels_b[None, :])

    def take_chunk(idx, in_order, kept):
        """Greedy NMS of candidates idx [chunk] (in visiting order) against the kept boxes."""
        num_kept, kept_idx, kept_boxes, kept_labels = kept
        boxes = cands.box_table[cands.box_index[idx]]
        labels = cands.labels[idx]
        suppressed = jnp.any(
            overlaps(boxes, labels, kept_boxes, kept_labels) & (slots < num_kept)[None, :], axis=1
        )
        alive0 = in_order & ~suppressed
        # Greedy order inside the chunk: j survives iff alive0[j] and no surviving i < j
        # suppresses it. Iterating that rule fixes at least one more leading entry per pass, so
        # it reaches the (unique) greedy answer, usually after a few passes.
        suppresses = overlaps(boxes, labels, boxes, labels) & later_in_chunk

        # The loop carries int32, not bool: vmapped, the loop selects its carry per image, and
        # onnxruntime has no bool `Where` for the ONNX export of that select.
        def step(carry):
            alive, _ = carry
            new = alive0 & ~jnp.any((alive > 0)[:, None] & suppresses, axis=0)
            return new.astype(jnp.int32), jnp.any(new != (alive > 0)).astype(jnp.int32)

        alive, _ = lax.while_loop(
            lambda c: c[1] > 0, step, (alive0.astype(jnp.int32), jnp.int32(1))
        )
        alive = alive > 0
        rank = num_kept + jnp.cumsum(alive.astype(jnp.int32)) - 1
        # Slot s takes the survivor of rank s. Written as a one-hot select and a gather rather
        # than a scatter: vmapped, a scatter carries batching dimensions that ONNX export
        # (jax2onnx) cannot convert; the result is the same.
        writes = (alive & (rank < max_det))[:, None] & (rank[:, None] == slots[None, :])
        written = jnp.any(writes, axis=0)
        writer = jnp.argmax(writes, axis=0)  # [max_det] the unique writer of each written slot
        kept_idx = jnp.where(written, idx[writer], kept_idx)
        kept_boxes = jnp.where(written[:, None], boxes[writer], kept_boxes)
        kept_labels = jnp.where(written, labels[writer], kept_labels)
        num_kept = jnp.minimum(num_kept + jnp.sum(alive.astype(jnp.int32)), max_det)
        return num_kept, kept_idx, kept_boxes, kept_labels

    def walk(order, num_in_order, kept):
        """Visit order[:num_in_order] chunk by chunk until max_det are kept."""
        last = order.shape[0] - 1

        def cond(carry):
            start, kept = carry
            return (kept[0] < max_det) & (start < num_in_order)

        def body(carry):
            start, kept = carry
            # A last partial chunk repeats the final entry; in_order masks the repeats. (No
            # padded copy of the order: ONNX export cannot pad inside a loop with a symbolic
            # batch.)
            idx = order[jnp.minimum(start + in_chunk, last)]
            in_order = start + in_chunk < num_in_order
            return start + chunk, take_chunk(idx, in_order, kept)

        return lax.while_loop(cond, body, (jnp.int32(0), kept))[1]

    def page_cond(state):
        num_visited, _, _, kept = state
        return (kept[0] < max_det) & (num_visited < num_valid)

    def page_body(state):
        num_visited, last_score, last_index, kept = state
        # Candidates of earlier pages come before (last_score, last_index) in the order.
        visited = (num_visited > 0) & (
            (cands.scores > last_score)
            | ((cands.scores == last_score) & (cand_index <= last_index))
        )
        page_order = _top_k_indices(jnp.where(visited, -jnp.inf, select_key), page, sort_top_k)
        kept = walk(page_order, jnp.minimum(page, num_valid - num_visited), kept)
        last = page_order[page - 1]
        return num_visited + page, cands.scores[last], last, kept

    kept = (
        jnp.int32(0),
        jnp.zeros((max_det,), jnp.int32),
        jnp.zeros((max_det, 4), cands.box_table.dtype),
        jnp.full((max_det,), -1, jnp.int32),
    )
    init = (jnp.int32(0), jnp.float32(jnp.inf), jnp.int32(-1), kept)
    num_kept, kept_idx, _, _ = lax.while_loop(page_cond, page_body, init)[3]
    return kept_idx, num_kept


def class_aware_nms(
    boxes: jax.Array,
    scores: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    *,
    iou_threshold: float,
    max_det: int,
    legacy_plus_one: bool = False,
    threshold_as_float64: bool = False,
    shift_limit: int = 0,
    chunk_size: int = 64,
    page_size: int = 2048,
) -> tuple[jax.Array, jax.Array]:
    """Exact greedy class-aware NMS of one image (jit/vmap friendly, fixed shapes).

    boxes: [N, 4] xyxy, pixels; scores: [N]; labels: [N] int class channels; valid: [N] bool.
    A box is suppressed by a kept box of the same label with IoU > iou_threshold (strictly;
    `legacy_plus_one`: +1 widths). `threshold_as_float64`: compare the float32 IoU with the
    threshold as a double, as torchvision.ops.nms does (else as float32, as mmdet/mmcv kernels).
    `shift_limit`: with at most this many valid boxes, IoUs are computed on boxes shifted by
    label * (max coordinate + 1), bit for bit as torchvision's batched_nms does (0: never).
    Boxes are visited by descending score, ties to the lower index.
    Returns the indices [max_det] int32 of the first max_det kept boxes in that order and a
    mask [max_det] bool of the filled rows (unfilled indices are 0)."""
    cands = _Candidates(
        boxes,
        jnp.arange(boxes.shape[0], dtype=jnp.int32),
        scores,
        labels.astype(jnp.int32),
        valid,
    )
    if shift_limit > 0:
        cands = _shift_by_label(cands, shift_limit)
    threshold = _float32_threshold(iou_threshold, threshold_as_float64)
    kept_idx, num_kept = _greedy_nms(
        cands, threshold, legacy_plus_one, max_det, chunk_size, page_size
    )
    return kept_idx, jnp.arange(max_det) < num_kept


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
        nms_cands = _shift_by_label(cands, None)
    elif mode == "torchvision" and BATCHED_NMS_SHIFT_LIMITS[batched_nms_device] > 0:
        nms_cands = _shift_by_label(cands, BATCHED_NMS_SHIFT_LIMITS[batched_nms_device])
    else:  # mmdet v1: one exact NMS per class
        nms_cands = cands
    threshold = _float32_threshold(nms_iou, compare_as_float64=mode == "torchvision")
    kept_idx, num_kept = _greedy_nms(
        nms_cands,
        threshold,
        mode == "mmdet_v1",
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
      slower; for runtimes that cannot read `chlo.top_k`, see `_top_k_indices`).

    Returns dict with D = max_per_img rows per image, sorted by score descending, invalid rows 0:
      boxes [B, D, 4] float32 xyxy in original image pixels, scores [B, D] float32,
      labels [B, D] int32 class channel, valid [B, D] bool.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if batched_nms_device not in BATCHED_NMS_SHIFT_LIMITS:
        raise ValueError(
            f"batched_nms_device: expected one of {sorted(BATCHED_NMS_SHIFT_LIMITS)}, "
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
