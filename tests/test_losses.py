"""losses: element-wise terms against torch/torchvision ops and hand values, fcos_loss against a
plain PyTorch transcription of docs/modes.md §2.8-§2.9 and §3.9 (v1 and v2.9 normalisers) and
against torchvision's FCOS.compute_loss, and finiteness of values and gradients in the corner
cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FCOS
from torchvision.models.detection.image_list import ImageList

from fcos_jax.detection import losses, targets

# --- element-wise terms -------------------------------------------------------------------------


def test_sigmoid_focal_loss_matches_torchvision():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(50, 6)).astype(np.float32)
    onehot = np.eye(6, dtype=np.float32)[rng.integers(0, 6, 50)] * (rng.random((50, 1)) < 0.5)
    ours = losses.sigmoid_focal_loss(jnp.asarray(logits), jnp.asarray(onehot), 0.25, 2.0)
    ref = torchvision.ops.sigmoid_focal_loss(
        torch.from_numpy(logits), torch.from_numpy(onehot), alpha=0.25, gamma=2.0
    )
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-7)


def test_focal_loss_gamma_and_alpha_are_used():
    # x = 0: p = 1/2. positive: alpha (1/2)^gamma log 2; negative: (1 - alpha) (1/2)^gamma log 2.
    values = losses.sigmoid_focal_loss(jnp.zeros(2), jnp.array([1.0, 0.0]), alpha=0.3, gamma=3.0)
    np.testing.assert_allclose(np.asarray(values), np.log(2) / 8 * np.array([0.3, 0.7]), rtol=1e-6)


def test_binary_cross_entropy_with_logits_matches_torch():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 5, size=40).astype(np.float32)
    t = rng.random(40).astype(np.float32)
    ours = losses.binary_cross_entropy_with_logits(jnp.asarray(logits), jnp.asarray(t))
    ref = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(t), reduction="none"
    )
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_iou_loss_hand_values_with_and_without_plus_one():
    pred, target = jnp.array([[0.0, 0, 9, 9]]), jnp.array([[5.0, 0, 14, 9]])
    # +1: areas 10*10, intersection 5*10 = 50, union 150 -> -log(1/3)
    np.testing.assert_allclose(losses.iou_loss(pred, target, True), [np.log(3)], rtol=1e-6)
    # no +1: areas 81, intersection 4*9 = 36, union 126 -> -log(36/126)
    np.testing.assert_allclose(losses.iou_loss(pred, target, False), [np.log(3.5)], rtol=1e-6)
    # disjoint boxes: IoU clamped to 1e-6
    far = jnp.array([[100.0, 100, 110, 110]])
    np.testing.assert_allclose(losses.iou_loss(pred, far, True), [-np.log(1e-6)], rtol=1e-6)


def test_giou_loss_matches_torchvision():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 50, size=(30, 2))
    b = rng.uniform(0, 50, size=(30, 2))
    pred = np.concatenate([a, a + rng.uniform(1, 40, size=(30, 2))], 1).astype(np.float32)
    target = np.concatenate([b, b + rng.uniform(1, 40, size=(30, 2))], 1).astype(np.float32)
    ours = losses.giou_loss(jnp.asarray(pred), jnp.asarray(target), False)
    ref = torchvision.ops.generalized_box_iou_loss(torch.from_numpy(pred), torch.from_numpy(target))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-6)


# --- fcos_loss against a PyTorch transcription of mmdet v1 (docs/modes.md §2.8, §2.9) -----------

STRIDES = (8, 16, 32)
RANGES = ((-1.0, 16.0), (16.0, 32.0), (32.0, 1e8))
FEATURES = ((8, 12), (4, 6), (2, 3))  # a 64x96 input
NUM_CLASSES = 4


def random_head_outputs(rng, batch, features, num_classes, bbox_scale=8.0):
    """Per-level NHWC float32 outputs with positive box distances in pixels."""
    outputs = []
    for h, w in features:
        outputs.append(
            {
                "cls_logits": rng.normal(0, 2, size=(batch, h, w, num_classes)).astype(np.float32),
                "bbox_reg": (bbox_scale * np.exp(rng.normal(0, 0.6, size=(batch, h, w, 4)))).astype(
                    np.float32
                ),
                "centerness": rng.normal(0, 1, size=(batch, h, w, 1)).astype(np.float32),
            }
        )
    return outputs


def small_ground_truth():
    boxes = np.array(
        [
            [[4, 6, 30, 28], [10, 12, 34, 28], [40, 2, 90, 60], [0, 0, 0, 0]],
            [[2, 2, 60, 62], [50, 20, 70, 36], [20.5, 30.25, 33, 50], [61, 5, 94, 33]],
        ],
        np.float32,
    )
    labels = np.array([[0, 3, 1, 0], [2, 2, 0, 1]], np.int32)
    valid = np.array([[True, True, True, False], [True, True, True, True]])
    return boxes, labels, valid


def torch_mmdet_reference(head_outputs, gt_boxes, gt_labels, normalizer):
    """mmdet v1 fcos_head.loss written from docs/modes.md §2.8-§2.9 with torch ops, in NCHW layout.

    gt_labels are 1-based as in mmdet (0 = background). normalizer: 'v1' or 'global' (v2.9)."""
    inf = 1e8
    batch = head_outputs[0]["cls_logits"].shape[0]
    cls = [torch.from_numpy(o["cls_logits"]).permute(0, 3, 1, 2) for o in head_outputs]
    reg = [torch.from_numpy(o["bbox_reg"]).permute(0, 3, 1, 2) for o in head_outputs]
    ctr = [torch.from_numpy(o["centerness"]).permute(0, 3, 1, 2) for o in head_outputs]
    points, ranges = [], []
    for level, (c, s) in enumerate(zip(cls, STRIDES, strict=True)):
        h, w = c.shape[-2:]
        ys, xs = torch.meshgrid(
            torch.arange(0, h * s, s, dtype=torch.float32),
            torch.arange(0, w * s, s, dtype=torch.float32),
            indexing="ij",
        )
        points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1) + s // 2)
        ranges.append(torch.tensor(RANGES[level]).expand(h * w, 2))
    all_points, all_ranges = torch.cat(points), torch.cat(ranges)
    labels_per_image, bbox_targets_per_image = [], []
    for boxes, labels in zip(gt_boxes, gt_labels, strict=True):
        boxes = torch.from_numpy(boxes)
        areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
        xs, ys = all_points[:, 0:1], all_points[:, 1:2]
        ltrb = torch.stack(
            [xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys], -1
        )
        inside = ltrb.min(-1)[0] > 0
        max_dist = ltrb.max(-1)[0]
        in_range = (max_dist >= all_ranges[:, 0:1]) & (max_dist <= all_ranges[:, 1:2])
        pair_areas = areas[None].repeat(len(all_points), 1)
        pair_areas[~inside] = inf
        pair_areas[~in_range] = inf
        min_area, min_idx = pair_areas.min(1)
        point_labels = torch.from_numpy(labels).long()[min_idx]
        point_labels[min_area == inf] = 0
        labels_per_image.append(point_labels)
        bbox_targets_per_image.append(ltrb[torch.arange(len(all_points)), min_idx])

    # flatten as mmdet: per level, images then points; point order is the same in every image
    def flat(tensors, channels):
        return torch.cat([t.permute(0, 2, 3, 1).reshape(-1, channels) for t in tensors])

    flat_cls = flat(cls, NUM_CLASSES)
    flat_reg = flat(reg, 4)
    flat_ctr = flat(ctr, 1)[:, 0]
    sizes = [c.shape[-2] * c.shape[-1] for c in cls]
    split_labels = [torch.split(lab, sizes) for lab in labels_per_image]
    split_targets = [torch.split(t, sizes) for t in bbox_targets_per_image]
    flat_labels = torch.cat([torch.cat([s[lv] for s in split_labels]) for lv in range(3)])
    flat_targets = torch.cat([torch.cat([s[lv] for s in split_targets]) for lv in range(3)])
    flat_points = torch.cat([p.repeat(batch, 1) for p in points])

    pos = (flat_labels > 0).nonzero().reshape(-1)
    num_pos = len(pos)
    p = torch.sigmoid(flat_cls)
    is_class = F.one_hot(flat_labels, NUM_CLASSES + 1)[:, 1:].float()
    alpha, gamma = 0.25, 2.0
    focal = -alpha * (1 - p) ** gamma * F.logsigmoid(flat_cls) * is_class - (
        1 - alpha
    ) * p**gamma * F.logsigmoid(-flat_cls) * (1 - is_class)
    cls_den = num_pos + batch if normalizer == "v1" else max(num_pos, 1)
    loss_cls = focal.sum() / cls_den

    pos_targets = flat_targets[pos]
    lr, tb = pos_targets[:, [0, 2]], pos_targets[:, [1, 3]]
    ctr_t = torch.sqrt(lr.min(-1)[0] / lr.max(-1)[0] * (tb.min(-1)[0] / tb.max(-1)[0]))

    def distance2bbox(pts, d):
        return torch.stack(
            [pts[:, 0] - d[:, 0], pts[:, 1] - d[:, 1], pts[:, 0] + d[:, 2], pts[:, 1] + d[:, 3]],
            -1,
        )

    pred_boxes = distance2bbox(flat_points[pos], flat_reg[pos])
    target_boxes = distance2bbox(flat_points[pos], pos_targets)
    lt = torch.max(pred_boxes[:, :2], target_boxes[:, :2])
    rb = torch.min(pred_boxes[:, 2:], target_boxes[:, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    area_p = (pred_boxes[:, 2] - pred_boxes[:, 0] + 1) * (pred_boxes[:, 3] - pred_boxes[:, 1] + 1)
    area_t = (target_boxes[:, 2] - target_boxes[:, 0] + 1) * (
        target_boxes[:, 3] - target_boxes[:, 1] + 1
    )
    iou = overlap / (area_p + area_t - overlap)
    box_loss = -torch.log(iou.clamp(min=1e-6))
    box_den = ctr_t.sum() if normalizer == "v1" else max(ctr_t.sum(), 1e-6)
    loss_bbox = (box_loss * ctr_t).sum() / box_den
    bce = F.binary_cross_entropy_with_logits(flat_ctr[pos], ctr_t, reduction="sum")
    loss_centerness = bce / (num_pos if normalizer == "v1" else max(num_pos, 1))
    return {
        "loss_cls": float(loss_cls),
        "loss_bbox": float(loss_bbox),
        "loss_centerness": float(loss_centerness),
        "num_pos": num_pos,
    }


def encode_batch(boxes, labels, valid, features, strides, ranges, **kwargs):
    fn = functools.partial(
        targets.encode, feature_sizes=features, strides=strides, regress_ranges=ranges, **kwargs
    )
    return jax.vmap(fn)(jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(valid))


def small_case(seed, valid=None, **encode_kwargs):
    """(head outputs, targets) of the loss tests: random outputs for 2 images drawn from `seed`,
    and `small_ground_truth`'s targets (its boxes marked `valid`, default its own mask) encoded
    with `encode_kwargs`."""
    rng = np.random.default_rng(seed)
    boxes, labels, own_valid = small_ground_truth()
    head_outputs = random_head_outputs(rng, 2, FEATURES, NUM_CLASSES)
    valid = own_valid if valid is None else valid
    batch_targets = encode_batch(boxes, labels, valid, FEATURES, STRIDES, RANGES, **encode_kwargs)
    return head_outputs, batch_targets


@pytest.mark.parametrize("normalizer", ["v1", "global"])
def test_mmdet_v1_losses_match_a_pytorch_transcription_of_mmdetection(normalizer):
    head_outputs, batch_targets = small_case(3, legacy_plus_one=True)
    boxes, labels, valid = small_ground_truth()
    ours = losses.fcos_loss(
        head_outputs,
        batch_targets,
        strides=STRIDES,
        legacy_plus_one=True,
        bbox_loss="iou",
        normalizer=normalizer,
    )
    ref = torch_mmdet_reference(
        head_outputs,
        [b[v] for b, v in zip(boxes, valid, strict=True)],
        [lab[v] + 1 for lab, v in zip(labels, valid, strict=True)],
        normalizer,
    )
    assert ref["num_pos"] > 10 and float(ours["num_pos"]) == ref["num_pos"]
    for key in ("loss_cls", "loss_bbox", "loss_centerness"):
        np.testing.assert_allclose(float(ours[key]), ref[key], rtol=1e-5, err_msg=key)
    total = ref["loss_cls"] + ref["loss_bbox"] + ref["loss_centerness"]
    np.testing.assert_allclose(float(ours["loss"]), total, rtol=1e-5)


def test_v1_normalizer_differs_from_global_in_the_classification_loss_only():
    head_outputs, batch_targets = small_case(4, legacy_plus_one=True)
    kwargs = dict(strides=STRIDES, legacy_plus_one=True)
    v1 = losses.fcos_loss(head_outputs, batch_targets, normalizer="v1", **kwargs)
    v2 = losses.fcos_loss(head_outputs, batch_targets, normalizer="global", **kwargs)
    num_pos = float(v1["num_pos"])
    np.testing.assert_allclose(
        float(v1["loss_cls"]) * (num_pos + 2), float(v2["loss_cls"]) * num_pos, rtol=1e-6
    )
    np.testing.assert_allclose(float(v1["loss_bbox"]), float(v2["loss_bbox"]), rtol=1e-6)
    np.testing.assert_allclose(
        float(v1["loss_centerness"]), float(v2["loss_centerness"]), rtol=1e-6
    )


def test_norm_on_bbox_leaves_the_scale_invariant_box_losses_unchanged():
    for bbox_loss in ("iou", "giou"):
        results = []
        for norm in (False, True):
            head_outputs, batch_targets = small_case(5, legacy_plus_one=False, norm_on_bbox=norm)
            results.append(
                losses.fcos_loss(
                    head_outputs,
                    batch_targets,
                    strides=STRIDES,
                    legacy_plus_one=False,
                    bbox_loss=bbox_loss,
                    norm_on_bbox=norm,
                )
            )
        for key in ("loss_cls", "loss_bbox", "loss_centerness"):
            np.testing.assert_allclose(
                float(results[0][key]), float(results[1][key]), rtol=1e-5, err_msg=key
            )


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
def test_micro_batches_with_whole_batch_normalizers_sum_to_the_whole_batch_loss(normalizer):
    head_outputs, batch_targets = small_case(10, legacy_plus_one=True)
    kwargs = dict(strides=STRIDES, legacy_plus_one=True, normalizer=normalizer)
    whole = losses.fcos_loss(head_outputs, batch_targets, **kwargs)
    assert set(whole) == set(losses.LOSS_TERMS)
    normalizers = losses.batch_normalizers(batch_targets)
    parts = [
        losses.fcos_loss(
            [{k: v[i : i + 1] for k, v in o.items()} for o in head_outputs],
            {k: v[i : i + 1] for k, v in batch_targets.items()},
            normalizers=normalizers,
            **kwargs,
        )
        for i in range(2)
    ]
    assert all(float(p["num_pos"]) > 0 for p in parts)
    for key in losses.LOSS_TERMS:
        np.testing.assert_allclose(
            sum(float(p[key]) for p in parts), float(whole[key]), rtol=1e-5, err_msg=key
        )


# --- fcos_loss against torchvision's FCOS.compute_loss -------------------------------------------


class _NoBackbone(torch.nn.Module):
    out_channels = 32


def test_torchvision_loss_matches_fcos_compute_loss():
    image_hw = (256, 384)  # a multiple of 128: torchvision's anchor grid step equals the stride
    strides = (8, 16, 32, 64, 128)
    features = tuple((image_hw[0] // s, image_hw[1] // s) for s in strides)
    ranges = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, 1e8))
    num_classes, batch, max_boxes = 5, 3, 6
    rng = np.random.default_rng(6)
    boxes = np.zeros((batch, max_boxes, 4), np.float32)
    labels = np.zeros((batch, max_boxes), np.int32)
    valid = np.zeros((batch, max_boxes), bool)
    for i, num in enumerate((6, 0, 3)):  # image 1 has no boxes
        xy = rng.uniform(0, 200, size=(num, 2))
        wh = rng.uniform(6, 250, size=(num, 2))
        boxes[i, :num] = np.concatenate([xy, np.minimum(xy + wh, [384, 256])], 1)
        labels[i, :num] = rng.integers(0, num_classes, num)
        valid[i, :num] = True

    num_points = sum(h * w for h, w in features)
    cls_logits = rng.normal(-2, 2, size=(batch, num_points, num_classes)).astype(np.float32)
    raw_reg = np.maximum(rng.normal(2, 1.5, size=(batch, num_points, 4)), 0).astype(np.float32)
    ctr_logits = rng.normal(0, 1, size=(batch, num_points, 1)).astype(np.float32)

    model = FCOS(_NoBackbone(), num_classes=num_classes)
    images = ImageList(torch.zeros(batch, 3, *image_hw), [image_hw] * batch)
    anchors = model.anchor_generator(images, [torch.zeros(batch, 1, h, w) for h, w in features])
    ref = model.compute_loss(
        [
            {
                "boxes": torch.from_numpy(boxes[i][valid[i]]),
                "labels": torch.from_numpy(labels[i][valid[i]]).long(),
            }
            for i in range(batch)
        ],
        {
            "cls_logits": torch.from_numpy(cls_logits),
            "bbox_regression": torch.from_numpy(raw_reg),
            "bbox_ctrness": torch.from_numpy(ctr_logits),
        },
        anchors,
        [h * w for h, w in features],
    )

    head_outputs, start = [], 0
    for (h, w), s in zip(features, strides, strict=True):
        rows = slice(start, start + h * w)
        start += h * w
        head_outputs.append(
            {
                "cls_logits": cls_logits[:, rows].reshape(batch, h, w, num_classes),
                "bbox_reg": (raw_reg[:, rows] * np.float32(s)).reshape(batch, h, w, 4),
                "centerness": ctr_logits[:, rows].reshape(batch, h, w, 1),
            }
        )
    batch_targets = encode_batch(
        boxes,
        labels,
        valid,
        features,
        strides,
        ranges,
        assigner="torchvision",
        center_sampling=True,
        legacy_plus_one=False,
    )
    ours = losses.fcos_loss(
        head_outputs,
        batch_targets,
        strides=strides,
        legacy_plus_one=False,
        bbox_loss="giou",
        normalizer="torchvision",
    )
    assert float(ours["num_pos"]) > 30
    for our_key, ref_key in (
        ("loss_cls", "classification"),
        ("loss_bbox", "bbox_regression"),
        ("loss_centerness", "bbox_ctrness"),
    ):
        np.testing.assert_allclose(
            float(ours[our_key]), float(ref[ref_key]), rtol=1e-5, err_msg=our_key
        )


# --- finiteness of values and gradients ---------------------------------------------------------


def loss_and_grads(head_outputs, batch_targets, **kwargs):
    def total(outputs):
        result = losses.fcos_loss(outputs, batch_targets, strides=STRIDES, **kwargs)
        return result["loss"], result

    (_, result), grads = jax.value_and_grad(total, has_aux=True)(head_outputs)
    return result, grads


def assert_all_finite(result, grads):
    for key, value in result.items():
        assert np.isfinite(float(value)), key
    for level, g in enumerate(grads):
        for key, value in g.items():
            assert np.isfinite(np.asarray(value)).all(), (level, key)


SETTINGS = [
    dict(normalizer=n, bbox_loss=b, legacy_plus_one=p)
    for n in losses.NORMALIZERS
    for b in losses.BBOX_LOSSES
    for p in (True, False)
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_batch_without_positives_gives_finite_values_and_gradients(setting):
    head_outputs, batch_targets = small_case(7, valid=np.zeros((2, 4), bool), legacy_plus_one=True)
    result, grads = loss_and_grads(head_outputs, batch_targets, **setting)
    assert_all_finite(result, grads)
    assert float(result["num_pos"]) == 0
    assert float(result["loss_bbox"]) == 0 and float(result["loss_centerness"]) == 0
    for g in grads:
        assert not np.asarray(g["bbox_reg"]).any() and not np.asarray(g["centerness"]).any()
    # only the focal term remains: sum over negatives / (0 + 2 images) or / 1
    all_logits = jnp.concatenate([o["cls_logits"].reshape(-1) for o in head_outputs])
    focal = losses.sigmoid_focal_loss(all_logits, jnp.zeros_like(all_logits)).sum()
    denominator = 2.0 if setting["normalizer"] == "v1" else 1.0
    np.testing.assert_allclose(float(result["loss_cls"]), float(focal) / denominator, rtol=1e-5)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_extreme_logits_huge_and_zero_boxes_give_finite_values_and_gradients(setting):
    rng = np.random.default_rng(8)
    boxes, labels, valid = small_ground_truth()
    boxes[0, 3] = [-1e5, -1e5, 1e5, 1e5]  # a huge gt box (level 2, range up to 1e8)
    valid[0, 3] = True
    head_outputs = random_head_outputs(rng, 2, FEATURES, NUM_CLASSES)
    for level, out in enumerate(head_outputs):
        sign = np.where(rng.random(out["cls_logits"].shape) < 0.5, -1, 1)
        out["cls_logits"] = (1e4 * sign).astype(np.float32)
        out["centerness"] = 1e4 * np.where(rng.random(out["centerness"].shape) < 0.5, -1, 1)
        out["centerness"] = out["centerness"].astype(np.float32)
        # dead ReLU (all distances 0), huge and tiny predictions
        choice = rng.integers(0, 3, size=out["bbox_reg"].shape[:-1] + (1,))
        out["bbox_reg"] = np.where(choice == 0, 0.0, np.where(choice == 1, 1e8, 1e-3))
        out["bbox_reg"] = out["bbox_reg"].astype(np.float32) * np.ones((1, 1, 1, 4), np.float32)
        head_outputs[level] = out
    batch_targets = encode_batch(
        boxes,
        labels,
        valid,
        FEATURES,
        STRIDES,
        RANGES,
        legacy_plus_one=setting["legacy_plus_one"],
    )
    assert bool(batch_targets["positive"][0, 96 + 24 :].any())  # level 2 took the huge box
    result, grads = loss_and_grads(head_outputs, batch_targets, **setting)
    assert float(result["num_pos"]) > 10
    assert_all_finite(result, grads)


def test_focal_and_centerness_gradients_are_finite_at_extreme_logits():
    logits = jnp.array([-1e4, -50.0, 0.0, 50.0, 1e4])
    for t in (0.0, 1.0):
        grad = jax.grad(lambda x, t=t: losses.sigmoid_focal_loss(x, jnp.full_like(x, t)).sum())(
            logits
        )
        assert np.isfinite(np.asarray(grad)).all()
        grad = jax.grad(
            lambda x, t=t: losses.binary_cross_entropy_with_logits(x, jnp.full_like(x, t)).sum()
        )(logits)
        assert np.isfinite(np.asarray(grad)).all()
    values = losses.sigmoid_focal_loss(logits, jnp.zeros_like(logits))
    np.testing.assert_allclose(float(values[-1]), 0.75 * 1e4, rtol=1e-6)


def test_fcos_loss_rejects_unknown_modes_and_mismatched_targets():
    head_outputs, batch_targets = small_case(9, legacy_plus_one=True)
    kwargs = dict(strides=STRIDES, legacy_plus_one=True)
    with pytest.raises(ValueError, match="bbox_loss"):
        losses.fcos_loss(head_outputs, batch_targets, bbox_loss="l1", **kwargs)
    with pytest.raises(ValueError, match="normalizer"):
        losses.fcos_loss(head_outputs, batch_targets, normalizer="mean", **kwargs)
    with pytest.raises(ValueError, match="targets"):
        losses.fcos_loss(head_outputs[:2], batch_targets, strides=STRIDES[:2], legacy_plus_one=True)
    with pytest.raises(ValueError, match="strides"):
        losses.fcos_loss(head_outputs, batch_targets, strides=STRIDES[:2], legacy_plus_one=True)
