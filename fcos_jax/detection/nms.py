"""Exact greedy class-aware NMS of one image, in fixed shapes (docs/modes.md §5).

A box is suppressed by a kept box of the same class with IoU > threshold (strictly), visiting
all candidates in descending score order with ties broken by the lower candidate index, and
stopping once max_det boxes are kept. It runs in fixed shapes: the candidate order comes in pages
from `lax.top_k` (no full sort), then a `lax.while_loop` takes chunks of each page, drops those
suppressed by already kept boxes, resolves the chunk's own greedy order by a fixed-point
iteration, and appends the survivors.

mmcv's (v3) and torchvision's batched_nms compute IoUs on boxes shifted by label * (max
coordinate + 1); that is reproduced bit for bit (`shift_by_label`), as are their float32 or
double threshold comparisons (`float32_threshold`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fcos_jax.detection import boxes as box_ops

# torchvision.ops.batched_nms runs one NMS over boxes shifted by label * (max coordinate + 1)
# when it has at most this many boxes (4000 coordinates on CPU, 100000 on CUDA), else an exact
# NMS per class; the shift's float32 rounding can move an IoU by ~1e-4. "exact": never shift.
BATCHED_NMS_SHIFT_LIMITS = {"cpu": 1000, "cuda": 25_000, "exact": 0}


class Candidates(NamedTuple):
    """Detection candidates of one image; NMS breaks score ties by the lower index (postprocess
    builds them in (level, point, class) order).

    box_table: [T, 4] xyxy boxes, pixels; box_index: [N] int32 row of box_table of each candidate
    (mmdet_v1 shares one box between the classes of a point); scores: [N] float32;
    labels: [N] int32 class channel; valid: [N] bool."""

    box_table: jax.Array
    box_index: jax.Array
    scores: jax.Array
    labels: jax.Array
    valid: jax.Array


def float32_threshold(threshold: float, compare_as_float64: bool) -> float:
    """The float32 t such that `iou_f32 > t` equals the reference's comparison.

    mmdet/mmcv kernels take the threshold as a C float (round to nearest float32); torchvision's
    takes a double and compares the float32 IoU promoted to double, which equals comparing with
    the largest float32 not above the threshold."""
    t = np.float32(threshold)
    if compare_as_float64 and float(t) > threshold:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


def top_k_indices(key: jax.Array, k: int, sort_top_k: bool) -> jax.Array:
    """Indices [k] of the k largest entries of key [N], largest first, ties to the lower index.

    The optimization barrier keeps XLA from folding later slices of the result into the sort
    that top_k is written as; when that happens XLA:CPU no longer recognises the top-k and runs
    a full sort, many times slower. `sort_top_k`: take the same indices from a
    full stable sort instead of `lax.top_k`, for runtimes that cannot read `chlo.top_k` (TF
    2.21's reader of the StableHLO that jax 0.10 writes)."""
    if sort_top_k:
        index = jnp.arange(key.shape[0], dtype=jnp.int32)
        return lax.sort((-key, index), num_keys=1, is_stable=True)[1][:k]
    return lax.optimization_barrier(lax.top_k(key, k)[1])


def shift_by_label(cands: Candidates, limit: int | None) -> Candidates:
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


def greedy_nms(
    cands: Candidates,
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
    walked in chunks of `chunk_size`. One page usually fills max_det. iou_thr: the float32
    threshold (`float32_threshold`); legacy_plus_one: +1 widths; sort_top_k: see `top_k_indices`.

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
        page_order = top_k_indices(jnp.where(visited, -jnp.inf, select_key), page, sort_top_k)
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
    cands = Candidates(
        boxes,
        jnp.arange(boxes.shape[0], dtype=jnp.int32),
        scores,
        labels.astype(jnp.int32),
        valid,
    )
    if shift_limit > 0:
        cands = shift_by_label(cands, shift_limit)
    threshold = float32_threshold(iou_threshold, threshold_as_float64)
    kept_idx, num_kept = greedy_nms(
        cands, threshold, legacy_plus_one, max_det, chunk_size, page_size
    )
    return kept_idx, jnp.arange(max_det) < num_kept
