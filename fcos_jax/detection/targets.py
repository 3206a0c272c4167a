"""FCOS training targets: which ground-truth box each point learns (docs/modes.md §2.8, §3.8,
§4.8).

`encode` takes one image's padded ground truth and returns per-point targets for all levels,
concatenated level by level (points row-major within a level, `points.py`). It is pure, has static
shapes and is jit- and vmap-friendly; vmap it over the batch. Memory is O(points x boxes).

Two assignment rules, chosen by `assigner`:
  mmdet        §2.8 (v1; with `center_sampling`, v1.2+/v2). Points at (j*s + s//2, i*s + s//2).
               Positive when min(ltrb) > 0 (against the centre sub-box when `center_sampling`) and
               lo <= max(ltrb) <= hi (inclusive); the smallest area wins, ties to the lower gt.
  torchvision  `FCOS.compute_loss`. Points at (j*s, i*s). Positive when max(|p - centre|) <
               radius*s (if `center_sampling`), min(ltrb) > 0 and lo < max(ltrb) < hi (strict);
               the gt with the largest float32 `1e8 - area` wins (areas within ~8 px^2 tie, and
               then the lower gt index wins). torchvision's ranges (0, 8s), (4s, 8s) ... (4s, inf)
               select the same points as the default `regress_ranges` under this strict test.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fcos_jax.detection import boxes as box_ops
from fcos_jax.detection import points as point_grid

ASSIGNERS = ("mmdet", "torchvision")
# torchvision: `pairwise_match * (1e8 - area)`, unmatched when the maximum is below 1e-5.
_TORCHVISION_AREA_CAP = 1e8
_TORCHVISION_MIN_SCORE = 1e-5


def level_constants(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    regress_ranges: Sequence[tuple[float, float]],
    assigner: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-point constants of all levels, concatenated (NumPy, folded into jitted code).

    Returns points [P, 2] float32 (x, y) pixels, point_strides [P] float32 pixels and
    ranges [P, 2] float32 (lo, hi) pixels, with P = sum of H*W over levels."""
    if assigner not in ASSIGNERS:
        raise ValueError(f"assigner: expected one of {ASSIGNERS}, got {assigner!r}")
    if not (len(feature_sizes) == len(strides) == len(regress_ranges)):
        raise ValueError(
            f"feature_sizes, strides, regress_ranges: expected one entry per level, got "
            f"{len(feature_sizes)}, {len(strides)} and {len(regress_ranges)}"
        )
    level_points = point_grid.all_level_points(feature_sizes, strides, assigner)
    counts = [p.shape[0] for p in level_points]
    points = np.concatenate(level_points, axis=0).astype(np.float32)
    point_strides = np.repeat(np.asarray(strides, np.float32), counts)
    ranges = np.repeat(np.asarray(regress_ranges, np.float32).reshape(-1, 2), counts, axis=0)
    return points, point_strides, ranges


def centerness_target(ltrb: jax.Array, positive: jax.Array) -> jax.Array:
    """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)). ltrb: [..., 4] distances (any unit, > 0
    where positive); positive: [...] bool -> [...] float32, 0 elsewhere (no NaN, also in grads)."""
    safe = jnp.where(positive[..., None], ltrb, 1.0)
    left_right = safe[..., 0::2]
    top_bottom = safe[..., 1::2]
    ratio = (left_right.min(-1) / left_right.max(-1)) * (top_bottom.min(-1) / top_bottom.max(-1))
    return jnp.where(positive, jnp.sqrt(ratio), 0.0)


def _check_inputs(boxes: jax.Array, labels: jax.Array, valid: jax.Array) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes: expected [M, 4] (vmap over the batch), got {tuple(boxes.shape)}")
    num_boxes = boxes.shape[0]
    if labels.shape != (num_boxes,):
        raise ValueError(f"labels: expected [{num_boxes}], got {tuple(labels.shape)}")
    if valid.shape != (num_boxes,):
        raise ValueError(f"valid: expected [{num_boxes}], got {tuple(valid.shape)}")


def encode(
    boxes: jax.Array,
    labels: jax.Array,
    valid: jax.Array,
    feature_sizes: Sequence[tuple[int, int]],
    *,
    strides: Sequence[int],
    regress_ranges: Sequence[tuple[float, float]],
    legacy_plus_one: bool,
    assigner: str = "mmdet",
    center_sampling: bool = False,
    center_sample_radius: float = 1.5,
    norm_on_bbox: bool = False,
) -> dict[str, jax.Array]:
    """FCOS targets of one image.

    Args:
      boxes: [M, 4] float xyxy, input pixels (padding rows arbitrary).
      labels: [M] int class channels 0..K-1.
      valid: [M] bool, False for padding rows (never assigned).
      feature_sizes: static per-level (H, W) in cells; strides: static per-level pixels.
      regress_ranges: per-level (lo, hi) bounds on max(l, t, r, b), pixels.
      legacy_plus_one: areas (for the min-area choice) with +1 widths (mmdet v1).
      assigner: 'mmdet' or 'torchvision' (module docstring).
      center_sampling, center_sample_radius: positives only within radius*stride of the gt centre.
      norm_on_bbox: divide the regression targets by the level stride (mmdet v2.2+).

    Returns a dict of P = sum(H*W) rows, levels concatenated, points row-major:
      positive [P] bool: the foreground mask (the authority on which points are positive).
      labels [P] int32: class channel of the assigned gt, -1 on background (so
        `jax.nn.one_hot(labels, K)` is the classification target).
      bbox_targets [P, 4] float32: (l, t, r, b) to the assigned gt, pixels (/ stride when
        norm_on_bbox); 0 on background.
      centerness_targets [P] float32: `centerness_target` of bbox_targets on positives, 0 on
        background.
      points [P, 2] float32: the (x, y) pixel locations used, for decoding boxes in the loss.
    """
    _check_inputs(boxes, labels, valid)
    points, point_strides, ranges = level_constants(
        feature_sizes, strides, regress_ranges, assigner
    )
    boxes = jnp.asarray(boxes, jnp.float32)
    valid = jnp.asarray(valid, bool)
    if boxes.shape[0] == 0:  # no gt rows at all: every point is background
        boxes = jnp.zeros((1, 4), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32)
        valid = jnp.zeros((1,), bool)
    point_pairs = points[:, None, :]  # [P, 1, 2]
    ltrb = box_ops.encode_ltrb(point_pairs, boxes[None, :, :])  # [P, M, 4]
    max_dist = ltrb.max(-1)
    lo, hi = ranges[:, 0:1], ranges[:, 1:2]
    radius = point_strides[:, None] * np.float32(center_sample_radius)  # [P, 1]
    center_x = (boxes[:, 0] + boxes[:, 2]) / 2  # [M]
    center_y = (boxes[:, 1] + boxes[:, 3]) / 2

    if assigner == "mmdet":
        if center_sampling:
            # the sub-box of half-size radius around the gt centre, clipped to the gt
            sub_box = jnp.stack(
                [
                    jnp.maximum(center_x - radius, boxes[:, 0]),
                    jnp.maximum(center_y - radius, boxes[:, 1]),
                    jnp.minimum(center_x + radius, boxes[:, 2]),
                    jnp.minimum(center_y + radius, boxes[:, 3]),
                ],
                axis=-1,
            )  # [P, M, 4]
            inside = box_ops.encode_ltrb(point_pairs, sub_box).min(-1) > 0
        else:
            inside = ltrb.min(-1) > 0
        eligible = inside & (max_dist >= lo) & (max_dist <= hi) & valid[None, :]
        areas = box_ops.area(boxes, legacy_plus_one)  # [M]
        assigned = jnp.argmin(jnp.where(eligible, areas[None, :], jnp.inf), axis=1)
        positive = eligible.any(axis=1)
    else:
        eligible = (ltrb.min(-1) > 0) & (max_dist > lo) & (max_dist < hi) & valid[None, :]
        if center_sampling:
            offset = jnp.maximum(
                jnp.abs(points[:, 0:1] - center_x[None, :]),
                jnp.abs(points[:, 1:2] - center_y[None, :]),
            )
            eligible &= offset < radius
        areas = box_ops.area(boxes, legacy_plus_one)
        score = jnp.where(eligible, np.float32(_TORCHVISION_AREA_CAP) - areas[None, :], 0.0)
        assigned = jnp.argmax(score, axis=1)
        positive = score.max(axis=1) >= _TORCHVISION_MIN_SCORE

    assigned_ltrb = box_ops.encode_ltrb(points, boxes[assigned])  # [P, 4], same values as ltrb
    if norm_on_bbox:
        assigned_ltrb = assigned_ltrb / point_strides[:, None]
    bbox_targets = jnp.where(positive[:, None], assigned_ltrb, 0.0)
    return {
        "positive": positive,
        "labels": jnp.where(positive, jnp.asarray(labels, jnp.int32)[assigned], -1),
        "bbox_targets": bbox_targets,
        "centerness_targets": centerness_target(bbox_targets, positive),
        "points": jnp.asarray(points),
    }
