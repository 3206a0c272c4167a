"""postprocess.detect against plain-NumPy implementations of the reference test paths
(docs/modes.md §2.5, §3.5, §4.5 and §5) and against torchvision's FCOS post-processing. The NMS
core alone is tested in test_nms.py."""

import math
import types

import jax
import numpy as np
import pytest
import torch
from detect_reference import (
    F32,
    MODE_SETTINGS,
    PADDED_HW,
    STRIDES,
    random_head,
    reference_detect,
    sigmoid,
)
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes

from fcos_jax.detection.postprocess import detect


@pytest.mark.parametrize(
    "mode, sort_top_k",
    [("mmdet_v1", False), ("mmdet_v3", False), ("torchvision", False), ("mmdet_v1", True)],
)
def test_detect_matches_numpy_reference_on_random_heads(mode, sort_top_k):
    # Small chunks and pages so that the NMS walks several of each (the hand-made cases below
    # run the default sizes); chunks of 3 do not divide the pages. sort_top_k: every top-k as
    # a full sort (the SavedModel export's formulation).
    max_det, chunk_size, page_size = 10, 3, 16
    head = random_head(
        seed={"mmdet_v1": 1, "mmdet_v3": 2, "torchvision": 3}[mode], batch=3, num_classes=4
    )
    sparse = np.random.default_rng(0)
    for level in head:  # image 2: few candidates, so it keeps fewer than max_det
        logits = level["cls_logits"][2]
        logits[...] = np.where(sparse.random(logits.shape) < 0.01, F32(2), F32(-10))
    image_hw = np.array([[60, 90], [64, 71], [33, 96]], np.int32)
    scale = np.array([[1.5, 1.5], [0.8, 0.75], [1.0, 1.0]], F32)
    original_hw = np.array([[40, 60], [80, 95], [33, 96]], np.int32)
    use_original = mode in ("mmdet_v3", "torchvision")
    settings = MODE_SETTINGS[mode]
    nms_pre = 20
    out = detect(
        [{k: jax.numpy.asarray(v) for k, v in level.items()} for level in head],
        image_hw,
        scale,
        mode=mode,
        strides=STRIDES,
        nms_pre=nms_pre,
        max_per_img=max_det,
        original_hw=original_hw if use_original else None,
        chunk_size=chunk_size,
        page_size=page_size,
        sort_top_k=sort_top_k,
        **settings,
    )
    out = jax.tree.map(np.asarray, out)
    assert out["boxes"].shape == (3, max_det, 4) and out["boxes"].dtype == np.float32
    assert out["labels"].dtype == np.int32 and out["valid"].dtype == bool
    num_candidates, num_kept = [], []
    for b in range(3):
        kept, n_cands = reference_detect(
            head, b, image_hw[b], scale[b], original_hw[b] if use_original else None, mode,
            nms_pre, settings["score_thr"], settings["nms_iou"], max_det,
        )  # fmt: skip
        num_candidates.append(n_cands)
        n = len(kept)
        num_kept.append(n)
        np.testing.assert_array_equal(out["valid"][b], np.arange(max_det) < n)
        np.testing.assert_array_equal(out["labels"][b, :n], [k[2] for k in kept])
        np.testing.assert_array_equal(out["scores"][b, :n], F32([k[0] for k in kept]))
        np.testing.assert_array_equal(out["boxes"][b, :n], F32([k[3] for k in kept]).reshape(-1, 4))
        assert not out["boxes"][b, n:].any() and not out["scores"][b, n:].any()
        assert not out["labels"][b, n:].any()
    # The data must exercise what the test is for: more candidates than a page, an image that
    # reaches max_det and one that does not.
    assert max(num_candidates) > page_size
    assert max(num_kept) == max_det and min(num_kept) < max_det


# Hand-made cases: one level of 2x3 points at stride 8 (a padded 16x24 input), 2 classes, and
# a second image in the batch whose logits are all -10 (it must come out empty every time).
# mmdet points: (4, 4), (12, 4), (20, 4) / (4, 12), (12, 12), (20, 12)  (x*8 + 4)
# torchvision points: (0, 0), (8, 0), (16, 0) / (0, 8), (8, 8), (16, 8)  (x*8)
HAND_SETTINGS = {
    "mmdet_v1": dict(score_thr=0.05, nms_iou=0.5),
    "mmdet_v3": dict(score_thr=0.05, nms_iou=0.5),
    "torchvision": dict(score_thr=0.2, nms_iou=0.5),
}


def run_hand(mode, cls_logits, bbox_reg, centerness=None, image_hw=(16, 24), scale=(1, 1), **kw):
    """cls_logits [2, 3, 2], bbox_reg [2, 3, 4], centerness [2, 3, 1] (default 0) for image 0.
    Returns image 0's detections (max_per_img 5); checks that image 1 has none."""
    cls_logits = F32(cls_logits)
    centerness = np.zeros((2, 3, 1), F32) if centerness is None else F32(centerness)
    head = [
        {
            "cls_logits": np.stack([cls_logits, np.full_like(cls_logits, -10)]),
            "bbox_reg": np.stack([F32(bbox_reg)] * 2),
            "centerness": np.stack([centerness] * 2),
        }
    ]
    out = detect(
        head,
        np.array([image_hw, image_hw]),
        F32([scale, scale]),
        mode=mode,
        strides=(8,),
        **{**HAND_SETTINGS[mode], "max_per_img": 5, **kw},
    )
    out = jax.tree.map(np.asarray, out)
    assert not out["valid"][1].any()
    assert not out["boxes"][1].any() and not out["scores"][1].any()
    assert not out["labels"][1].any()
    return jax.tree.map(lambda x: x[0], out)


@pytest.mark.parametrize("mode", ["mmdet_v1", "mmdet_v3", "torchvision"])
def test_image_without_detections_is_all_invalid_and_zero(mode):
    out = run_hand(mode, np.full((2, 3, 2), -10), np.full((2, 3, 4), 5))
    assert not out["valid"].any() and not out["boxes"].any() and not out["scores"].any()


def test_iou_exactly_at_threshold_is_not_suppressed_mmdet_v1_plus_one():
    reg, logits = np.zeros((2, 3, 4), F32), np.full((2, 3, 2), -10, F32)
    # Class 0: A = [0, 0, 15, 15] (16x16 with +1) from (4, 4), B = [0, 0, 15, 7] (16x8) from
    # (12, 4): IoU = 128 / 256 = 0.5 exactly, not > 0.5: both kept.
    reg[0, 0], logits[0, 0, 0] = [4, 4, 11, 11], 3
    reg[0, 1], logits[0, 1, 0] = [12, 4, 3, 3], 2
    # Class 1: E = [8, 0, 23, 8] (16x9) from (20, 4), F = [8, 0, 23, 15] from (20, 12):
    # IoU = 144 / 256 > 0.5: E (lower score) is suppressed.
    reg[0, 2], logits[0, 2, 1] = [12, 4, 3, 4], 1
    reg[1, 2], logits[1, 2, 1] = [12, 12, 3, 3], 2.5
    out = run_hand("mmdet_v1", logits, reg)
    np.testing.assert_array_equal(out["valid"], [True, True, True, False, False])
    np.testing.assert_array_equal(out["labels"][:3], [0, 1, 0])
    np.testing.assert_array_equal(out["boxes"][:3], [[0, 0, 15, 15], [8, 0, 23, 15], [0, 0, 15, 7]])


def test_iou_exactly_at_threshold_is_not_suppressed_torchvision():
    reg, logits = np.zeros((2, 3, 4), F32), np.full((2, 3, 2), -10, F32)
    # Class 0: A = [0, 0, 16, 16] from (8, 8), B = [0, 0, 16, 8] from (8, 0): IoU = 0.5: kept.
    reg[1, 1], logits[1, 1, 0] = [8, 8, 8, 8], 3
    reg[0, 1], logits[0, 1, 0] = [8, 0, 8, 8], 2
    # Class 1: E = [8, 0, 24, 9] from (16, 0), F = [8, 0, 24, 16] from (16, 8): IoU 0.5625.
    reg[0, 2], logits[0, 2, 1] = [8, 0, 8, 9], 1
    reg[1, 2], logits[1, 2, 1] = [8, 8, 8, 8], 2.5
    out = run_hand("torchvision", logits, reg)
    np.testing.assert_array_equal(out["valid"], [True, True, True, False, False])
    np.testing.assert_array_equal(out["labels"][:3], [0, 1, 0])
    np.testing.assert_array_equal(out["boxes"][:3], [[0, 0, 16, 16], [8, 0, 24, 16], [0, 0, 16, 8]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("mmdet_v1", [0, 0, 9.5, 7.5]),  # clamp to [0, 19] x [0, 15], then / 2
        ("mmdet_v3", [0, 0, 10, 8]),  # clip to [0, 20] x [0, 16], then * 1/2
        ("torchvision", [0, 0, 10, 8]),  # clip to [0, 20] x [0, 16], NMS, then / 2
    ],
)
def test_boxes_crossing_the_image_border_are_clipped_to_the_unpadded_image(mode, expected):
    # One box covering everything; the unpadded resized image is 16 rows x 20 columns of the
    # 16x24 input, scale 2 (original 8x10).
    logits = np.full((2, 3, 2), -10, F32)
    logits[1, 1, 1] = 3
    out = run_hand(mode, logits, np.full((2, 3, 4), 30), image_hw=(16, 20), scale=(2, 2))
    np.testing.assert_array_equal(out["valid"], [True, False, False, False, False])
    np.testing.assert_array_equal(out["boxes"][0], F32(expected))


@pytest.mark.parametrize("sort_top_k", [False, True])
def test_tied_scores_keep_the_lower_point_then_the_lower_class(sort_top_k):
    # All 12 (point, class) logits equal: one score. Boxes of size 4 around each point never
    # overlap. Order must be (p0,c0), (p0,c1), (p1,c0), (p1,c1), (p2,c0), ...
    reg, logits = np.full((2, 3, 4), 2, F32), np.ones((2, 3, 2), F32)
    out = run_hand("torchvision", logits, reg, sort_top_k=sort_top_k)
    np.testing.assert_array_equal(out["labels"], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(out["boxes"][:, 0], [0, 0, 6, 6, 14])  # points x 0, 0, 8, 8, 16
    # Per-level top-k ties also go to the lower (point, class) index: the top 3 pairs.
    out = run_hand("torchvision", logits, reg, nms_pre=3, sort_top_k=sort_top_k)
    np.testing.assert_array_equal(out["valid"], [True, True, True, False, False])
    np.testing.assert_array_equal(out["labels"][:3], [0, 1, 0])
    np.testing.assert_array_equal(out["boxes"][:3, 0], [0, 0, 6])
    # mmdet_v1 keeps the top points (ties: lower point) before thresholding pairs.
    out = run_hand("mmdet_v1", logits, reg, nms_pre=2, sort_top_k=sort_top_k)
    np.testing.assert_array_equal(out["valid"], [True, True, True, True, False])
    np.testing.assert_array_equal(out["labels"][:4], [0, 1, 0, 1])
    np.testing.assert_array_equal(out["boxes"][:4, 0], [2, 2, 10, 10])  # points x 4, 4, 12, 12


def test_mmdet_v1_thresholds_raw_class_score_before_centerness():
    # cls = sigmoid(0) = 0.5 > 0.05 passes even though cls*ctr = 0.5*sigmoid(-6) < 0.05.
    logits, ctr = np.full((2, 3, 2), -10, F32), np.zeros((2, 3, 1), F32)
    logits[0, 0, 0], ctr[0, 0, 0] = 0, -6
    out = run_hand("mmdet_v1", logits, np.full((2, 3, 4), 2), ctr)
    np.testing.assert_array_equal(out["valid"], [True, False, False, False, False])
    np.testing.assert_array_equal(out["scores"][0], F32(0.5) * sigmoid(F32(-6)))


def test_mmdet_v3_drops_boxes_without_area():
    reg, logits = np.zeros((2, 3, 4), F32), np.full((2, 3, 2), -10, F32)
    logits[0, :2, 0] = 1  # point 0 has a zero-size box, point 1 a 2x2 box
    reg[0, 1] = [1, 1, 1, 1]
    out = run_hand("mmdet_v3", logits, reg)
    np.testing.assert_array_equal(out["valid"], [True, False, False, False, False])
    np.testing.assert_array_equal(out["boxes"][0], [11, 3, 13, 5])


def test_bad_inputs_name_the_field():
    head = [
        {
            "cls_logits": np.zeros((1, 2, 2, 1), F32),
            "bbox_reg": np.zeros((1, 2, 2, 4), F32),
            "centerness": np.zeros((1, 2, 2, 1), F32),
        }
    ]
    hw, scale = np.array([[8, 8]]), F32([[1, 1]])
    kw = dict(strides=(8,), score_thr=0.1, nms_iou=0.5)
    with pytest.raises(ValueError, match="mode"):
        detect(head, hw, scale, mode="v1", **kw)
    with pytest.raises(ValueError, match="scale"):
        detect(head, hw, F32([1, 1]), mode="mmdet_v1", **kw)
    with pytest.raises(ValueError, match="head_outputs"):
        detect(head, hw, scale, mode="mmdet_v1", **{**kw, "strides": (8, 16)})
    bad = [{**head[0], "centerness": np.zeros((1, 2, 2, 2), F32)}]
    with pytest.raises(ValueError, match="centerness"):
        detect(bad, hw, scale, mode="mmdet_v1", **kw)


def test_torchvision_mode_matches_torchvision_fcos_postprocess_detections():
    # torchvision's own code end to end: AnchorGenerator anchors for a 64x96 input (P6 steps
    # by 96 // 2 = 48 in x, not 64), FCOS.postprocess_detections (threshold, top-k, decode,
    # clip, batched_nms with its label shift on CPU, first 100) and transform.resize_boxes.
    rng = np.random.default_rng(11)
    batch, num_classes, nms_pre, max_det = 2, 12, 30, 20
    shapes = [(math.ceil(PADDED_HW[0] / s), math.ceil(PADDED_HW[1] / s)) for s in STRIDES]
    cls = [rng.normal(-1, 1.5, (batch, h, w, num_classes)).astype(F32) for h, w in shapes]
    rel = [rng.uniform(0, 3, (batch, h, w, 4)).astype(F32) for h, w in shapes]
    # P6 detections must show up, small enough not to be clipped to the whole image: their
    # position depends on the anchor step.
    cls[3] += 3
    rel[3] *= 0.2
    ctr = [rng.normal(0, 1, (batch, h, w, 1)).astype(F32) for h, w in shapes]
    image_hw = np.array([[60, 90], [64, 75]])
    original_hw = np.array([[45, 67], [128, 150]])

    generator = AnchorGenerator(tuple((s,) for s in STRIDES), ((1.0,),) * len(STRIDES))
    images = ImageList(torch.zeros(batch, 3, *PADDED_HW), [tuple(hw) for hw in image_hw.tolist()])
    features = [torch.zeros(batch, 1, h, w) for h, w in shapes]
    anchors = generator(images, features)
    counts = [h * w for h, w in shapes]
    split_anchors = [list(a.split(counts)) for a in anchors]
    to_torch = lambda arrays: [torch.from_numpy(a.reshape(batch, -1, a.shape[-1])) for a in arrays]
    head_outputs = {
        "cls_logits": to_torch(cls),
        "bbox_regression": to_torch(rel),
        "bbox_ctrness": to_torch(ctr),
    }
    settings = types.SimpleNamespace(
        score_thresh=0.2,
        nms_thresh=0.6,
        detections_per_img=max_det,
        topk_candidates=nms_pre,
        box_coder=det_utils.BoxLinearCoder(normalize_by_size=True),
    )
    expected = FCOS.postprocess_detections(
        settings, head_outputs, split_anchors, images.image_sizes
    )

    ours = detect(
        [
            {"cls_logits": c, "bbox_reg": r * F32(s), "centerness": t}  # relu(x) * anchor size
            for c, r, t, s in zip(cls, rel, ctr, STRIDES, strict=True)
        ],
        image_hw,
        np.ones((batch, 2), F32),
        original_hw=original_hw,
        mode="torchvision",
        strides=STRIDES,
        nms_pre=nms_pre,
        score_thr=0.2,
        nms_iou=0.6,
        max_per_img=max_det,
    )
    ours = jax.tree.map(np.asarray, ours)
    for b in range(batch):
        want = expected[b]
        n = len(want["scores"])
        assert 5 < n < max_det or n == max_det
        np.testing.assert_array_equal(ours["valid"][b], np.arange(max_det) < n)
        np.testing.assert_array_equal(ours["labels"][b, :n], want["labels"].numpy())
        np.testing.assert_allclose(ours["scores"][b, :n], want["scores"].numpy(), rtol=1e-6)
        boxes = resize_boxes(want["boxes"], image_hw[b].tolist(), original_hw[b].tolist())
        np.testing.assert_array_equal(ours["boxes"][b, :n], boxes.numpy())
