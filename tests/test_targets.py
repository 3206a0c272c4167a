"""targets.encode: hand-computed cases, a NumPy reference under hypothesis, torchvision parity.

Small setting used throughout: a 64x64 input, strides (8, 16, 32) -> feature maps 8x8, 4x4, 2x2
(P = 84), regress ranges (-1, 16), (16, 32), (32, 1e8). mmdet points sit at j*s + s//2
(4, 12, 20, ... on level 0), torchvision points at j*s.
"""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torchvision.models.detection import FCOS
from torchvision.models.detection.image_list import ImageList

from fcos_jax.detection import targets

FEATURES = ((8, 8), (4, 4), (2, 2))
STRIDES = (8, 16, 32)
RANGES = ((-1.0, 16.0), (16.0, 32.0), (32.0, 1e8))
LEVEL_START = (0, 64, 80)
NUM_POINTS = 84


def point_index(level: int, x: float, y: float, offset: bool = True) -> int:
    """Index in the concatenated point list of the level-`level` point at pixel (x, y)."""
    stride = STRIDES[level]
    shift = stride // 2 if offset else 0
    col, row = (x - shift) / stride, (y - shift) / stride
    assert col == int(col) and row == int(row), (x, y)
    return LEVEL_START[level] + int(row) * FEATURES[level][1] + int(col)


@functools.partial(
    jax.jit,
    static_argnames=(
        "assigner",
        "center_sampling",
        "center_sample_radius",
        "norm_on_bbox",
        "legacy_plus_one",
    ),
)
def encode_small(
    boxes,
    labels,
    valid,
    assigner="mmdet",
    center_sampling=False,
    center_sample_radius=1.5,
    norm_on_bbox=False,
    legacy_plus_one=True,
):
    return targets.encode(
        boxes,
        labels,
        valid,
        FEATURES,
        strides=STRIDES,
        regress_ranges=RANGES,
        assigner=assigner,
        center_sampling=center_sampling,
        center_sample_radius=center_sample_radius,
        norm_on_bbox=norm_on_bbox,
        legacy_plus_one=legacy_plus_one,
    )


def run(boxes, labels=None, valid=None, **kwargs):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.arange(len(boxes), dtype=np.int32) if labels is None else np.asarray(labels)
    valid = np.ones(len(boxes), bool) if valid is None else np.asarray(valid)
    out = encode_small(jnp.asarray(boxes), jnp.asarray(labels, jnp.int32), valid, **kwargs)
    return {k: np.asarray(v) for k, v in out.items()}


def assert_background_elsewhere(out, positives):
    mask = np.zeros(NUM_POINTS, bool)
    mask[list(positives)] = True
    np.testing.assert_array_equal(out["positive"], mask)
    assert (out["labels"][~mask] == -1).all()
    assert (out["bbox_targets"][~mask] == 0).all()
    assert (out["centerness_targets"][~mask] == 0).all()


def test_one_box_gives_the_hand_computed_point_targets():
    # Level-0 points strictly inside [10, 34] x [12, 28]: x in {12, 20, 28}, y = 20; only (20, 20)
    # has max(ltrb) <= 16. Level 1 (24, 24) has max 14 < 16, level 2 (16, 16) has max 18 < 32.
    out = run([[10, 12, 34, 28]], labels=[2])
    idx = point_index(0, 20, 20)
    assert_background_elsewhere(out, [idx])
    assert out["labels"][idx] == 2
    np.testing.assert_array_equal(out["bbox_targets"][idx], [10, 8, 14, 8])
    np.testing.assert_allclose(out["centerness_targets"][idx], np.sqrt(10 / 14), rtol=1e-6)
    np.testing.assert_array_equal(out["points"][idx], [20, 20])


def test_norm_on_bbox_divides_targets_by_the_stride_and_keeps_centerness():
    out = run([[10, 12, 34, 28]], labels=[2], norm_on_bbox=True)
    idx = point_index(0, 20, 20)
    np.testing.assert_array_equal(out["bbox_targets"][idx], [10 / 8, 1, 14 / 8, 1])
    np.testing.assert_allclose(out["centerness_targets"][idx], np.sqrt(10 / 14), rtol=1e-6)


def test_outputs_have_the_documented_shapes_and_dtypes():
    out = run([[10, 12, 34, 28]])
    assert out["positive"].shape == (NUM_POINTS,) and out["positive"].dtype == bool
    assert out["labels"].shape == (NUM_POINTS,) and out["labels"].dtype == np.int32
    assert out["bbox_targets"].shape == (NUM_POINTS, 4) and out["bbox_targets"].dtype == np.float32
    assert out["centerness_targets"].shape == (NUM_POINTS,)
    assert out["points"].shape == (NUM_POINTS, 2)
    np.testing.assert_array_equal(out["points"][LEVEL_START[1]], [8, 8])


def test_nested_boxes_take_the_smaller_area():
    # (20, 20) is inside both with max(ltrb) 14 and 6: both eligible on level 0.
    out = run([[6, 6, 34, 34], [14, 14, 26, 26]], labels=[5, 7])
    idx = point_index(0, 20, 20)
    assert out["labels"][idx] == 7
    np.testing.assert_array_equal(out["bbox_targets"][idx], [6, 6, 6, 6])


def test_equal_areas_go_to_the_lower_index_and_plus_one_can_break_the_tie():
    # A: 10 x 21 (area 210, +1: 11*22 = 242); B: 14 x 15 (area 210, +1: 15*16 = 240).
    boxes = [[12, 8, 22, 29], [10, 10, 24, 25]]
    idx = point_index(0, 20, 20)
    assert run(boxes, legacy_plus_one=False)["labels"][idx] == 0
    assert run(boxes, legacy_plus_one=True)["labels"][idx] == 1
    assert run(boxes[::-1], legacy_plus_one=False)["labels"][idx] == 0


def test_max_distance_on_a_range_boundary_is_inside_both_ranges_for_mmdet():
    # Level 0 (20, 20) in [4, 10, 30, 30]: ltrb (16, 10, 10, 10), max = 16 = hi of level 0.
    out = run([[4, 10, 30, 30]])
    idx = point_index(0, 20, 20)
    assert out["positive"][idx]
    np.testing.assert_array_equal(out["bbox_targets"][idx], [16, 10, 10, 10])
    # Level 1 (24, 24) in [8, 16, 40, 30]: ltrb (16, 8, 16, 6), max = 16 = lo of level 1.
    out = run([[8, 16, 40, 30]])
    idx = point_index(1, 24, 24)
    assert out["positive"][idx]
    np.testing.assert_array_equal(out["bbox_targets"][idx], [16, 8, 16, 6])


def test_max_distance_on_a_range_boundary_is_excluded_by_torchvision():
    # torchvision points: (16, 16) in [0, 4, 32, 20] has ltrb (16, 12, 16, 4) on level 0 and
    # level 1; max = 16 is neither < 16 (level 0 hi) nor > 16 (level 1 lo).
    out = run([[0, 4, 32, 20]], assigner="torchvision", legacy_plus_one=False)
    assert not out["positive"][point_index(0, 16, 16, offset=False)]
    assert not out["positive"][point_index(1, 16, 16, offset=False)]
    # Moving the right edge by one pixel makes max = 17 > 16: a level-1 positive.
    out = run([[0, 4, 33, 20]], assigner="torchvision", legacy_plus_one=False)
    assert out["positive"][point_index(1, 16, 16, offset=False)]


def test_point_on_the_box_edge_is_not_inside():
    # Level-0 points x = 12 and 28 lie on the left and right edges of [12, 12, 28, 28].
    out = run([[12, 12, 28, 28]])
    assert_background_elsewhere(out, [point_index(0, 20, 20)])


@pytest.mark.parametrize("assigner", ["mmdet", "torchvision"])
def test_degenerate_boxes_get_no_points_and_do_not_block_others(assigner):
    degenerate = [[20, 8, 20, 40], [30, 30, 10, 10], [0, 0, 0, 0]]
    alone = run(degenerate, assigner=assigner)
    assert not alone["positive"].any()
    assert np.isfinite(alone["centerness_targets"]).all()
    good = [[10, 12, 34, 28]]
    with_good = run(degenerate + good, assigner=assigner)
    only_good = run(good, labels=[3], assigner=assigner)
    np.testing.assert_array_equal(with_good["positive"], only_good["positive"])
    np.testing.assert_array_equal(with_good["bbox_targets"], only_good["bbox_targets"])
    assert (with_good["labels"][with_good["positive"]] == 3).all()


@pytest.mark.parametrize("assigner", ["mmdet", "torchvision"])
def test_no_valid_box_gives_all_background(assigner):
    out = run([[10, 12, 34, 28], [0, 0, 64, 64]], valid=[False, False], assigner=assigner)
    assert_background_elsewhere(out, [])


def test_zero_box_rows_give_all_background():
    out = targets.encode(
        jnp.zeros((0, 4)),
        jnp.zeros((0,), jnp.int32),
        jnp.zeros((0,), bool),
        FEATURES,
        strides=STRIDES,
        regress_ranges=RANGES,
        legacy_plus_one=True,
    )
    assert not np.asarray(out["positive"]).any()
    assert out["bbox_targets"].shape == (NUM_POINTS, 4)


@pytest.mark.parametrize("assigner", ["mmdet", "torchvision"])
def test_padding_rows_are_never_assigned(assigner):
    # The padding row is smaller and would win every point of the real box if it were valid.
    real, padding = [6, 6, 34, 34], [14, 14, 26, 26]
    out = run(
        [padding, real, padding], labels=[9, 1, 9], valid=[False, True, False], assigner=assigner
    )
    only_real = run([real], labels=[1], assigner=assigner)
    for key in ("positive", "labels", "bbox_targets", "centerness_targets"):
        np.testing.assert_array_equal(out[key], only_real[key])
    assert out["positive"].any()


def test_mmdet_center_sampling_keeps_points_within_radius_of_the_center():
    # One level, range unlimited. Box [0, 0, 64, 64], centre 32, radius 1.5*8 = 12: sub-box
    # (20, 44) strictly contains the points 28 and 36 on each axis (of 4, 12, ..., 60).
    kwargs = dict(strides=(8,), regress_ranges=((-1, 1e8),), legacy_plus_one=True)
    sampled = jax.jit(
        functools.partial(targets.encode, center_sampling=True, **kwargs), static_argnums=3
    )
    box, label, valid = jnp.array([[0.0, 0, 64, 64]]), jnp.array([0]), jnp.array([True])
    out = sampled(box, label, valid, ((8, 8),))
    expected = [y * 8 + x for y in (3, 4) for x in (3, 4)]
    np.testing.assert_array_equal(np.flatnonzero(out["positive"]), expected)
    assert int(targets.encode(box, label, valid, ((8, 8),), **kwargs)["positive"].sum()) == 64
    # A thin box: the sub-box is clipped to the gt, x in (0, 10) keeps only the column x = 4.
    out = sampled(jnp.array([[0.0, 0, 10, 64]]), label, valid, ((8, 8),))
    np.testing.assert_array_equal(np.flatnonzero(out["positive"]), [3 * 8, 4 * 8])


def test_torchvision_center_sampling_uses_the_unshifted_points():
    # Points 0, 8, ..., 56; |p - 32| < 12 keeps 24, 32, 40 on each axis: 9 points.
    kwargs = dict(strides=(8,), regress_ranges=((-1, 1e8),), legacy_plus_one=False)
    out = targets.encode(
        jnp.array([[0.0, 0, 64, 64]]),
        jnp.array([0]),
        jnp.array([True]),
        ((8, 8),),
        assigner="torchvision",
        center_sampling=True,
        **kwargs,
    )
    expected = [y * 8 + x for y in (3, 4, 5) for x in (3, 4, 5)]
    np.testing.assert_array_equal(np.flatnonzero(out["positive"]), expected)


def test_torchvision_ties_areas_that_round_to_the_same_float32_score():
    # Areas 99 (index 0) and 97.375 (index 1): 1e8 - area rounds to 99999904 for both, so
    # torchvision keeps index 0 while the mmdet rule takes the smaller area.
    boxes = [[16, 16, 25, 27], [15, 15, 24.5, 25.25]]
    assert np.float32(1e8) - np.float32(99) == np.float32(1e8) - np.float32(97.375)
    idx = point_index(0, 24, 24, offset=False)
    out = run(boxes, assigner="torchvision", legacy_plus_one=False)
    assert out["positive"][idx] and out["labels"][idx] == 0
    # mmdet points differ; (20, 20) is in both boxes too.
    out = run(boxes, assigner="mmdet", legacy_plus_one=False)
    assert out["labels"][point_index(0, 20, 20)] == 1


def test_encode_rejects_bad_inputs_naming_the_field():
    box, label, valid = jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32), jnp.ones((2,), bool)
    kwargs = dict(strides=STRIDES, regress_ranges=RANGES, legacy_plus_one=True)
    with pytest.raises(ValueError, match="assigner"):
        targets.encode(box, label, valid, FEATURES, assigner="retina", **kwargs)
    with pytest.raises(ValueError, match="labels"):
        targets.encode(box, label[:1], valid, FEATURES, **kwargs)
    with pytest.raises(ValueError, match="boxes"):
        targets.encode(box[None], label, valid, FEATURES, **kwargs)
    with pytest.raises(ValueError, match="strides"):
        targets.encode(box, label, valid, FEATURES[:2], **kwargs)


def test_encode_vmaps_over_a_batch():
    boxes = jnp.array([[[10.0, 12, 34, 28], [0, 0, 0, 0]], [[6, 6, 34, 34], [14, 14, 26, 26]]])
    labels = jnp.array([[2, 0], [5, 7]])
    valid = jnp.array([[True, False], [True, True]])
    batched = jax.vmap(encode_small)(boxes, labels, valid)
    assert batched["bbox_targets"].shape == (2, NUM_POINTS, 4)
    assert batched["points"].shape == (2, NUM_POINTS, 2)
    for i in range(2):
        single = run(boxes[i], labels[i], valid[i])
        np.testing.assert_array_equal(np.asarray(batched["labels"][i]), single["labels"])


# --- NumPy reference written from docs/modes.md §2.8 (mmdet) and torchvision's compute_loss ---


def reference_points(assigner):
    rows = []
    for (h, w), s in zip(FEATURES, STRIDES, strict=True):
        shift = s // 2 if assigner == "mmdet" else 0
        ys, xs = np.meshgrid(np.arange(h) * s + shift, np.arange(w) * s + shift, indexing="ij")
        for x, y in zip(xs.ravel(), ys.ravel(), strict=True):
            rows.append((np.float32(x), np.float32(y), s))
    return rows


def reference_eligible(x, y, stride, level, box, assigner, center_sampling, radius=1.5):
    x1, y1, x2, y2 = (np.float32(v) for v in box)
    ltrb = (x - x1, y - y1, x2 - x, y2 - y)
    lo, hi = RANGES[level]
    cx, cy = (x1 + x2) / np.float32(2), (y1 + y2) / np.float32(2)
    r = np.float32(stride * radius)
    if assigner == "mmdet":
        if center_sampling:
            sub = (max(cx - r, x1), max(cy - r, y1), min(cx + r, x2), min(cy + r, y2))
            inside = min(x - sub[0], y - sub[1], sub[2] - x, sub[3] - y) > 0
        else:
            inside = min(ltrb) > 0
        return inside and lo <= max(ltrb) <= hi
    ok = min(ltrb) > 0 and lo < max(ltrb) < hi
    if center_sampling:
        ok = ok and max(abs(x - cx), abs(y - cy)) < r
    return ok


def reference_encode(boxes, labels, valid, assigner, center_sampling, legacy_plus_one):
    plus = 1 if legacy_plus_one else 0
    areas = [np.float32((b[2] - b[0] + plus) * (b[3] - b[1] + plus)) for b in boxes]
    level_of_stride = {s: i for i, s in enumerate(STRIDES)}
    result = []
    for x, y, s in reference_points(assigner):
        best = None
        for j, box in enumerate(boxes):
            if not valid[j]:
                continue
            if not reference_eligible(x, y, s, level_of_stride[s], box, assigner, center_sampling):
                continue
            if assigner == "mmdet":
                better = best is None or areas[j] < areas[best]
            else:  # largest float32 (1e8 - area), first index on ties
                score = np.float32(1e8) - areas[j]
                better = best is None or score > np.float32(1e8) - areas[best]
            if better:
                best = j
        result.append((x, y, best))
    return result


box_coordinate = st.integers(0, 64).map(float) | st.floats(0, 64, width=32)


@st.composite
def ground_truth(draw):
    num = draw(st.integers(1, 5))
    boxes = []
    for _ in range(num):
        xa, xb = draw(box_coordinate), draw(box_coordinate)
        ya, yb = draw(box_coordinate), draw(box_coordinate)
        # mostly well-formed boxes, sometimes degenerate or reversed ones
        if draw(st.booleans()) or draw(st.booleans()):
            xa, xb = sorted((xa, xb))
            ya, yb = sorted((ya, yb))
        boxes.append([xa, ya, xb, yb])
    boxes += [[0.0, 0.0, 0.0, 0.0]] * (5 - num)
    valid = [draw(st.booleans()) or draw(st.booleans()) for _ in range(num)] + [False] * (5 - num)
    return np.asarray(boxes, np.float32), np.asarray(valid)


@settings(max_examples=25, deadline=None)
@given(
    gt=ground_truth(),
    assigner=st.sampled_from(["mmdet", "torchvision"]),
    center_sampling=st.booleans(),
    legacy_plus_one=st.booleans(),
)
def test_assignment_matches_a_plain_reference_of_the_rules(
    gt, assigner, center_sampling, legacy_plus_one
):
    boxes, valid = gt
    labels = np.arange(5, dtype=np.int32) + 10
    out = run(
        boxes,
        labels,
        valid,
        assigner=assigner,
        center_sampling=center_sampling,
        legacy_plus_one=legacy_plus_one,
    )
    expected = reference_encode(boxes, labels, valid, assigner, center_sampling, legacy_plus_one)
    for p, (x, y, best) in enumerate(expected):
        assert out["positive"][p] == (best is not None), (p, x, y)
        if best is None:
            continue
        assert out["labels"][p] == labels[best]
        x1, y1, x2, y2 = boxes[best]
        ltrb = np.array([x - x1, y - y1, x2 - x, y2 - y], np.float32)
        np.testing.assert_array_equal(out["bbox_targets"][p], ltrb)
        # every positive lies strictly inside its box and its max ltrb lies in its level range
        assert ltrb.min() > 0
        level = int(np.searchsorted(LEVEL_START, p, side="right") - 1)
        assert RANGES[level][0] <= ltrb.max() <= RANGES[level][1]
        ratio = (min(ltrb[0], ltrb[2]) / max(ltrb[0], ltrb[2])) * (
            min(ltrb[1], ltrb[3]) / max(ltrb[1], ltrb[3])
        )
        np.testing.assert_allclose(out["centerness_targets"][p], np.sqrt(ratio), rtol=1e-6)
    assert np.isfinite(out["centerness_targets"]).all()


# --- torchvision parity: FCOS.compute_loss's own matching --------------------------------------


class _NoBackbone(torch.nn.Module):
    out_channels = 32


def torchvision_matched_idxs(image_hw, feature_sizes, gts):
    """Run torchvision's FCOS.compute_loss on zero head outputs and capture its matched_idxs."""
    model = FCOS(_NoBackbone(), num_classes=3)
    captured = {}

    def capture(targets_, head_outputs, anchors, matched_idxs):
        captured["matched"] = [m.numpy() for m in matched_idxs]
        captured["anchors"] = [a.numpy() for a in anchors]
        return {}

    model.head.compute_loss = capture
    batch = len(gts)
    images = ImageList(torch.zeros(batch, 3, *image_hw), [tuple(image_hw)] * batch)
    features = [torch.zeros(batch, 1, h, w) for h, w in feature_sizes]
    anchors = model.anchor_generator(images, features)
    num_points = sum(h * w for h, w in feature_sizes)
    head_outputs = {
        "cls_logits": torch.zeros(batch, num_points, 3),
        "bbox_regression": torch.zeros(batch, num_points, 4),
        "bbox_ctrness": torch.zeros(batch, num_points, 1),
    }
    targets_ = [
        {
            "boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(lab, dtype=torch.int64),
        }
        for b, lab in gts
    ]
    model.compute_loss(targets_, head_outputs, anchors, [h * w for h, w in feature_sizes])
    return captured["matched"], captured["anchors"]


def test_torchvision_assignment_matches_fcos_compute_loss():
    # 256x384 input (a multiple of 128, where torchvision's anchor grid step equals the stride)
    image_hw = (256, 384)
    strides = (8, 16, 32, 64, 128)
    feature_sizes = tuple((image_hw[0] // s, image_hw[1] // s) for s in strides)
    ranges = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, 1e8))
    rng = np.random.default_rng(0)
    gts = []
    for num in (7, 0, 3):
        xy = rng.uniform(0, 200, size=(num, 2))
        wh = rng.uniform(4, 250, size=(num, 2))
        b = np.concatenate([xy, np.minimum(xy + wh, [384, 256])], axis=1).astype(np.float32)
        if num == 7:
            b[5] = b[4] + np.float32(0.5)  # area ~2 px^2 below box 4's: a float32 1e8 - area tie
            b[5, 3] -= np.float32(2.0) / (b[4, 2] - b[4, 0])
            b[6] = [100, 60, 300, 240]
        gts.append((b, rng.integers(0, 3, size=num)))
    matched, anchors = torchvision_matched_idxs(image_hw, feature_sizes, gts)
    for (b, lab), m, a in zip(gts, matched, anchors, strict=True):
        padded = np.zeros((8, 4), np.float32)
        padded[: len(b)] = b
        valid = np.arange(8) < len(b)
        labels = np.zeros(8, np.int32)
        labels[: len(b)] = lab
        out = targets.encode(
            jnp.asarray(padded),
            jnp.asarray(labels),
            jnp.asarray(valid),
            feature_sizes,
            strides=strides,
            regress_ranges=ranges,
            assigner="torchvision",
            center_sampling=True,
            center_sample_radius=1.5,
            legacy_plus_one=False,
        )
        np.testing.assert_array_equal(np.asarray(out["points"]), (a[:, :2] + a[:, 2:]) / 2)
        np.testing.assert_array_equal(np.asarray(out["positive"]), m >= 0)
        expected_labels = np.where(m >= 0, labels[np.clip(m, 0, None)], -1)
        np.testing.assert_array_equal(np.asarray(out["labels"]), expected_labels)
        pos = m >= 0
        center = (a[:, :2] + a[:, 2:]) / 2
        matched_boxes = b[m[pos]] if len(b) else np.zeros((0, 4), np.float32)
        expected_ltrb = np.concatenate(
            [center[pos] - matched_boxes[:, :2], matched_boxes[:, 2:] - center[pos]], axis=1
        )
        np.testing.assert_array_equal(np.asarray(out["bbox_targets"])[pos], expected_ltrb)
    assert sum(int((m >= 0).sum()) for m in matched) > 50
