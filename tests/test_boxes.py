"""detection/boxes.py against hand-computed values (with and without the +1 convention) and
torchvision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from fcos_jax.detection import boxes as B

F32 = np.float32


def test_area_with_and_without_plus_one():
    boxes = F32([[0, 0, 9, 9], [2, 3, 6, 4]])
    np.testing.assert_array_equal(B.area(boxes), [81, 4])
    np.testing.assert_array_equal(B.area(boxes, legacy_plus_one=True), [100, 10])


def test_decode_and_encode_ltrb_are_inverse_and_match_hand_values():
    points = F32([[5, 5], [0, 10]])
    ltrb = F32([[1, 2, 3, 4], [0.5, 0, 2, 1]])
    boxes = B.decode_ltrb(points, ltrb)
    np.testing.assert_array_equal(boxes, [[4, 3, 8, 9], [-0.5, 10, 2, 11]])
    np.testing.assert_array_equal(B.encode_ltrb(points, boxes), ltrb)


def test_numpy_in_gives_numpy_out_and_jax_in_gives_jax_out():
    boxes = F32([[0, 0, 4, 4]])
    assert isinstance(B.area(boxes), np.ndarray)
    assert isinstance(B.clip_boxes(boxes, (3, 3)), np.ndarray)
    assert isinstance(B.iou_matrix(boxes, boxes), np.ndarray)
    assert isinstance(B.area(jnp.asarray(boxes)), jax.Array)
    assert isinstance(B.clip_boxes(jnp.asarray(boxes), (3, 3)), jax.Array)
    jitted = jax.jit(lambda b: B.giou_aligned(b, b + 1.0, legacy_plus_one=True))
    assert isinstance(jitted(jnp.asarray(boxes)), jax.Array)


def test_aligned_iou_hand_values():
    a = F32([[0, 0, 10, 10], [0, 0, 4, 4], [0, 0, 4, 4]])
    b = F32([[5, 5, 15, 15], [4, 0, 8, 4], [6, 0, 8, 4]])
    # no +1: 25 / 175; boxes sharing the edge x=4 do not overlap; disjoint.
    np.testing.assert_allclose(B.iou_aligned(a, b), [25 / 175, 0, 0], rtol=1e-7)
    # +1: inter 6*6=36, areas 121: 36/206; the shared edge is a 1x5 strip: 5/(25+25-5); disjoint.
    np.testing.assert_allclose(B.iou_aligned(a, b, True), [36 / 206, 5 / 45, 0], rtol=1e-7)


def test_aligned_giou_hand_values_and_torchvision():
    a = F32([[0, 0, 2, 2], [0, 0, 10, 10]])
    b = F32([[3, 0, 5, 2], [5, 5, 15, 15]])
    # disjoint: iou 0, enclosing [0,0,5,2] area 10, union 8: -0.2.
    # overlapping: iou 25/175, enclosing 225: 25/175 - 50/225.
    np.testing.assert_allclose(B.giou_aligned(a, b), [-0.2, 25 / 175 - 50 / 225], rtol=1e-6)
    # +1: disjoint pair: union 9+9=18, enclosing 6*3=18: giou 0.
    np.testing.assert_allclose(B.giou_aligned(a[:1], b[:1], True), [0.0], atol=1e-7)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (64, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (64, 2))], 1).astype(F32)
    other = boxes[::-1].copy()
    expected = torchvision.ops.generalized_box_iou_loss(
        torch.from_numpy(boxes), torch.from_numpy(other), eps=1e-7
    ).numpy()
    np.testing.assert_allclose(1 - B.giou_aligned(boxes, other, eps=1e-7), expected, atol=1e-6)


def test_iou_matrix_matches_torchvision_and_plus_one_hand_value():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 40, (20, 2))
    a = np.concatenate([xy, xy + rng.uniform(1, 20, (20, 2))], 1).astype(F32)
    b = a[:7] + F32(3)
    expected = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(B.iou_matrix(a, b), expected, rtol=1e-6)
    np.testing.assert_allclose(B.iou_matrix(jnp.asarray(a), jnp.asarray(b)), expected, rtol=1e-6)
    got = B.iou_matrix(F32([[0, 0, 15, 15]]), F32([[0, 0, 15, 7], [16, 0, 20, 4]]), True)
    np.testing.assert_array_equal(got, [[0.5, 0.0]])  # 16*8 / (256 + 128 - 128); disjoint


def test_clip_boxes_to_last_pixel_with_plus_one_and_to_the_edge_without():
    boxes = F32([[-5, -5, 30, 20], [3, 4, 5, 6]])
    np.testing.assert_array_equal(
        B.clip_boxes(boxes, (16, 24), legacy_plus_one=True), [[0, 0, 23, 15], [3, 4, 5, 6]]
    )
    np.testing.assert_array_equal(B.clip_boxes(boxes, (16, 24)), [[0, 0, 24, 16], [3, 4, 5, 6]])
    # batched: one (h, w) per image, broadcast over that image's boxes
    batch = jnp.stack([jnp.asarray(boxes), jnp.asarray(boxes)])
    hw = jnp.array([[16, 24], [10, 4]])[:, None, :]
    np.testing.assert_array_equal(
        B.clip_boxes(batch, hw), [[[0, 0, 24, 16], [3, 4, 5, 6]], [[0, 0, 4, 10], [3, 4, 4, 6]]]
    )


def test_flip_horizontal_hand_values_and_involution():
    boxes = F32([[2, 3, 7, 9]])
    np.testing.assert_array_equal(B.flip_horizontal(boxes, 20, True), [[12, 3, 17, 9]])
    np.testing.assert_array_equal(B.flip_horizontal(boxes, 20), [[13, 3, 18, 9]])
    for plus_one in (True, False):
        twice = B.flip_horizontal(B.flip_horizontal(boxes, 20, plus_one), 20, plus_one)
        np.testing.assert_array_equal(twice, boxes)


def test_coco_xywh_conversions_with_and_without_plus_one():
    xywh = F32([[10, 20, 5, 6]])
    np.testing.assert_array_equal(B.coco_xywh_to_xyxy(xywh, True), [[10, 20, 14, 25]])
    np.testing.assert_array_equal(B.coco_xywh_to_xyxy(xywh), [[10, 20, 15, 26]])
    np.testing.assert_array_equal(B.xyxy_to_coco_xywh(F32([[10, 20, 14, 25]]), True), xywh)
    np.testing.assert_array_equal(B.xyxy_to_coco_xywh(F32([[10, 20, 15, 26]])), xywh)


def test_wrong_last_dimension_names_the_argument():
    with pytest.raises(ValueError, match="boxes"):
        B.area(F32([[0, 0, 1]]))
    with pytest.raises(ValueError, match="points"):
        B.decode_ltrb(F32([[0, 0, 1]]), F32([[1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="hw"):
        B.clip_boxes(F32([[0, 0, 1, 1]]), (1, 2, 3))


@pytest.mark.parametrize("legacy_plus_one", [False, True])
def test_jitted_iou_is_bit_identical_to_numpy_float32(legacy_plus_one):
    # XLA:CPU would otherwise fuse products and sums into FMAs (boxes.rounded_product).
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 500, (400, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 300, (400, 2))], 1).astype(F32)
    a, b = boxes[:200], boxes[200:]
    jitted = jax.jit(
        lambda a, b: (
            B.iou_matrix(a, b, legacy_plus_one),
            B.iou_aligned(a, b, legacy_plus_one),
            B.giou_aligned(a, b, legacy_plus_one, eps=1e-7),
        )
    )
    got = jitted(a, b)
    np.testing.assert_array_equal(got[0], B.iou_matrix(a, b, legacy_plus_one))
    np.testing.assert_array_equal(got[1], B.iou_aligned(a, b, legacy_plus_one))
    np.testing.assert_array_equal(got[2], B.giou_aligned(a, b, legacy_plus_one, eps=1e-7))
