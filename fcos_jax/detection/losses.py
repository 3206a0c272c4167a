"""FCOS losses: sigmoid focal, IoU / GIoU box losses, centerness BCE and their normalisation.

docs/modes.md §2.9 (mmdet v1), §3.9 (v2.9+) and §4.9 (torchvision). `fcos_loss` takes the model's
per-level outputs and the vmapped output of `targets.encode` for the whole (global) batch; every
normaliser is a sum over that batch, so the result does not depend on how the batch is sharded.

Normalisers (`normalizer`), with N = positives in the batch, B = images in the batch, c = the
centerness targets of the positives:
  v1           cls / (N + B); box sum(loss * c) / sum(c); centerness mean over positives
               (box and centerness are 0 when N = 0). mmdet v1's rule with its per-GPU counts
               replaced by batch counts: equal to it on one device.
  global       mmdet v2.9+: cls / max(N, 1); box sum(loss * c) / max(sum(c), 1e-6);
               centerness / max(N, 1).
  torchvision  cls, box (unweighted) and centerness sums, each / max(N, 1).
For gradient accumulation, compute `batch_normalizers` once on the whole batch and pass them to
`fcos_loss` for every micro-batch: the micro-batch losses then sum to the whole batch's loss.
Every value and gradient stays finite for images without positives and for extreme logits: rows
that are not positive are replaced by harmless values before any division (the double-where
trick), so they get exactly zero gradient.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fcos_jax.detection import boxes as box_ops

BBOX_LOSSES = ("iou", "giou")
NORMALIZERS = ("global", "v1", "torchvision")
LOSS_TERMS = ("loss", "loss_cls", "loss_bbox", "loss_centerness", "num_pos")  # fcos_loss's keys
NORMALIZER_TERMS = ("num_pos", "centerness_sum", "num_images")  # batch_normalizers's keys
IOU_LOSS_EPS = 1e-6  # mmdet IoULoss: IoU clamped to at least this before -log
GIOU_EPS = 1e-7  # torchvision generalized_box_iou_loss eps


def sigmoid_focal_loss(
    logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0
) -> jax.Array:
    """Element-wise sigmoid focal loss (no reduction). logits, targets: same shape; targets in
    {0, 1} (one-hot class channels).

    t * -alpha (1-p)^gamma log(p) + (1-t) * -(1-alpha) p^gamma log(1-p), with p = sigmoid(x) and
    the logs taken as log_sigmoid(+-x), so +-1e4 logits give finite values and gradients."""
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    prob = jax.nn.sigmoid(logits)
    one_minus_prob = jax.nn.sigmoid(-logits)
    positive_term = -alpha * one_minus_prob**gamma * jax.nn.log_sigmoid(logits)
    negative_term = -(1.0 - alpha) * prob**gamma * jax.nn.log_sigmoid(-logits)
    return targets * positive_term + (1.0 - targets) * negative_term


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Element-wise BCE on logits (no reduction): -(t log sigmoid(x) + (1-t) log sigmoid(-x))."""
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    return -(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))


def iou_loss(
    pred_boxes: jax.Array, target_boxes: jax.Array, legacy_plus_one: bool, eps: float = IOU_LOSS_EPS
) -> jax.Array:
    """-log(max(IoU, eps)) of aligned box pairs. pred_boxes, target_boxes: [..., 4] xyxy pixels
    -> [...]. IoU from `boxes.iou_aligned` (+1 widths when legacy_plus_one, mmdet v1)."""
    iou = box_ops.iou_aligned(pred_boxes, target_boxes, legacy_plus_one)
    return -jnp.log(jnp.maximum(iou, eps))


def giou_loss(
    pred_boxes: jax.Array, target_boxes: jax.Array, legacy_plus_one: bool, eps: float = GIOU_EPS
) -> jax.Array:
    """1 - GIoU of aligned box pairs. pred_boxes, target_boxes: [..., 4] xyxy pixels -> [...]."""
    return 1.0 - box_ops.giou_aligned(pred_boxes, target_boxes, legacy_plus_one, eps=eps)


def flatten_head_outputs(
    head_outputs: Sequence[dict[str, jax.Array]], strides: Sequence[int]
) -> tuple[jax.Array, jax.Array, jax.Array, np.ndarray]:
    """Concatenate per-level NHWC outputs in the `targets.encode` point order.

    Returns cls_logits [B, P, K], bbox_reg [B, P, 4] pixels, centerness [B, P] logits (float32)
    and point_strides [P] (NumPy)."""
    if len(head_outputs) != len(strides):
        raise ValueError(
            f"head_outputs, strides: expected one stride per level, got {len(head_outputs)} "
            f"levels and {len(strides)} strides"
        )
    cls_logits, bbox_reg, centerness, counts = [], [], [], []
    for level, out in enumerate(head_outputs):
        batch, height, width, num_classes = out["cls_logits"].shape
        for key, channels in (("bbox_reg", 4), ("centerness", 1)):
            if out[key].shape != (batch, height, width, channels):
                raise ValueError(
                    f"head_outputs[{level}]['{key}']: expected {(batch, height, width, channels)},"
                    f" got {tuple(out[key].shape)}"
                )
        cls_logits.append(out["cls_logits"].reshape(batch, height * width, num_classes))
        bbox_reg.append(out["bbox_reg"].reshape(batch, height * width, 4))
        centerness.append(out["centerness"].reshape(batch, height * width))
        counts.append(height * width)
    point_strides = np.repeat(np.asarray(strides, np.float32), counts)
    return (
        jnp.concatenate(cls_logits, axis=1).astype(jnp.float32),
        jnp.concatenate(bbox_reg, axis=1).astype(jnp.float32),
        jnp.concatenate(centerness, axis=1).astype(jnp.float32),
        point_strides,
    )


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, and 0 (with zero gradients) where denominator is 0."""
    nonzero = denominator > 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def batch_normalizers(targets: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The counts the normalisers divide by, over a whole batch of `targets.encode` outputs:
    num_pos (positives), centerness_sum (sum of the positives' centerness targets) and num_images,
    float32 scalars."""
    positive = targets["positive"]
    return {
        "num_pos": positive.astype(jnp.float32).sum(),
        "centerness_sum": jnp.where(positive, targets["centerness_targets"], 0.0).sum(),
        "num_images": jnp.asarray(positive.shape[0], jnp.float32),
    }


def fcos_loss(
    head_outputs: Sequence[dict[str, jax.Array]],
    targets: dict[str, jax.Array],
    *,
    strides: Sequence[int],
    legacy_plus_one: bool,
    bbox_loss: str = "iou",
    normalizer: str = "global",
    norm_on_bbox: bool = False,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    normalizers: dict[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """FCOS training loss of a batch.

    Args:
      head_outputs: per level {'cls_logits' [B,H,W,K], 'bbox_reg' [B,H,W,4] positive (l,t,r,b)
        distances in input pixels, 'centerness' [B,H,W,1] logits}.
      targets: `targets.encode` vmapped over the batch: positive [B,P], labels [B,P] (-1 on
        background), bbox_targets [B,P,4], centerness_targets [B,P], points [B,P,2].
      strides: per-level strides, pixels.
      legacy_plus_one: +1 widths in the IoU / GIoU (mmdet v1).
      bbox_loss: 'iou' (-log IoU, mmdet) or 'giou' (1 - GIoU).
      normalizer: 'global', 'v1' or 'torchvision' (module docstring).
      norm_on_bbox: bbox_targets are / stride (encode's flag): predictions are divided by the stride
        too, and both are decoded around the points as mmdet v2 does.
      focal_alpha, focal_gamma: sigmoid focal loss parameters.
      normalizers: `batch_normalizers` of the whole batch when this is one micro-batch of it;
        None: computed from `targets`.

    Returns the LOSS_TERMS scalars: loss (sum of the three), loss_cls, loss_bbox, loss_centerness
    and num_pos (positives in `targets`, float32).
    """
    if bbox_loss not in BBOX_LOSSES:
        raise ValueError(f"bbox_loss: expected one of {BBOX_LOSSES}, got {bbox_loss!r}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer: expected one of {NORMALIZERS}, got {normalizer!r}")
    cls_logits, bbox_reg, centerness, point_strides = flatten_head_outputs(head_outputs, strides)
    batch, num_points, num_classes = cls_logits.shape
    if targets["positive"].shape != (batch, num_points):
        raise ValueError(
            f"targets['positive']: expected {(batch, num_points)} to match head_outputs, got "
            f"{tuple(targets['positive'].shape)}"
        )
    positive = targets["positive"]
    if normalizers is None:
        normalizers = batch_normalizers(targets)
    num_pos = normalizers["num_pos"]
    centerness_sum_all = normalizers["centerness_sum"]

    cls_targets = jax.nn.one_hot(targets["labels"], num_classes, dtype=jnp.float32)
    cls_sum = sigmoid_focal_loss(cls_logits, cls_targets, focal_alpha, focal_gamma).sum()

    pred_ltrb = bbox_reg / point_strides[:, None] if norm_on_bbox else bbox_reg
    pred_ltrb = jnp.where(positive[..., None], pred_ltrb, 1.0)
    target_ltrb = jnp.where(positive[..., None], targets["bbox_targets"], 1.0)
    points = targets["points"]
    pred_boxes = box_ops.decode_ltrb(points, pred_ltrb)
    target_boxes = box_ops.decode_ltrb(points, target_ltrb)
    if bbox_loss == "iou":
        box_per_point = iou_loss(pred_boxes, target_boxes, legacy_plus_one)
    else:
        box_per_point = giou_loss(pred_boxes, target_boxes, legacy_plus_one)
    box_per_point = jnp.where(positive, box_per_point, 0.0)

    centerness_targets = jnp.where(positive, targets["centerness_targets"], 0.0)
    centerness_per_point = jnp.where(
        positive, binary_cross_entropy_with_logits(centerness, centerness_targets), 0.0
    )
    centerness_sum = centerness_per_point.sum()

    if normalizer == "torchvision":
        denominator = jnp.maximum(num_pos, 1.0)
        loss_cls = cls_sum / denominator
        loss_bbox = box_per_point.sum() / denominator
        loss_centerness = centerness_sum / denominator
    elif normalizer == "global":
        denominator = jnp.maximum(num_pos, 1.0)
        loss_cls = cls_sum / denominator
        loss_bbox = (box_per_point * centerness_targets).sum() / jnp.maximum(
            centerness_sum_all, 1e-6
        )
        loss_centerness = centerness_sum / denominator
    else:  # v1
        loss_cls = cls_sum / (num_pos + normalizers["num_images"])
        loss_bbox = _safe_divide((box_per_point * centerness_targets).sum(), centerness_sum_all)
        loss_centerness = _safe_divide(centerness_sum, num_pos)
    return {
        "loss": loss_cls + loss_bbox + loss_centerness,
        "loss_cls": loss_cls,
        "loss_bbox": loss_bbox,
        "loss_centerness": loss_centerness,
        "num_pos": positive.astype(jnp.float32).sum(),
    }
