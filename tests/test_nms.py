"""nms.class_aware_nms against torchvision.ops.nms / batched_nms and a plain sequential
reference (docs/modes.md §5)."""

import jax
import numpy as np
import pytest
import torch
import torchvision
from detect_reference import F32, greedy_nms_reference

from fcos_jax.detection.nms import class_aware_nms

_nms = jax.jit(
    class_aware_nms,
    static_argnames=(
        "iou_threshold",
        "max_det",
        "legacy_plus_one",
        "threshold_as_float64",
        "shift_limit",
        "chunk_size",
        "page_size",
    ),
)


def test_torchvision_compares_iou_with_the_threshold_as_a_double():
    # IoU = 30 / 100 rounds to float32 0.30000001 > 0.3 (double): torchvision suppresses, a C
    # float threshold (mmdet/mmcv) does not.
    boxes = F32([[0, 0, 10, 10], [0, 0, 10, 3]])
    scores, labels, valid = F32([0.9, 0.8]), np.zeros(2, np.int32), np.ones(2, bool)
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.3)
    assert expected.tolist() == [0]
    for as_float64, kept in ((True, [True, False]), (False, [True, True])):
        _, keep_valid = _nms(
            boxes, scores, labels, valid, iou_threshold=0.3, max_det=2,
            threshold_as_float64=as_float64,
        )  # fmt: skip
        np.testing.assert_array_equal(keep_valid, kept)


@pytest.mark.parametrize(
    "iou_threshold, chunk_size, page_size",
    [(0.3, 8, 32), (0.5, 64, 2048)],
    ids=["small", "default"],
)
def test_class_aware_nms_matches_torchvision_batched_nms(iou_threshold, chunk_size, page_size):
    rng = np.random.default_rng(7)
    n = 300
    # Integer coordinates: torchvision's coordinate-offset trick is then exact.
    xy = rng.integers(0, 60, (n, 2))
    wh = rng.integers(1, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(F32)
    scores = rng.permutation(n).astype(F32) / n + F32(0.01)  # distinct
    labels = rng.integers(0, 4, n).astype(np.int32)
    valid = rng.random(n) < 0.9
    idx = np.flatnonzero(valid)
    expected = idx[
        torchvision.ops.batched_nms(
            torch.from_numpy(boxes[idx]), torch.from_numpy(scores[idx]),
            torch.from_numpy(labels[idx]), iou_threshold,
        ).numpy()
    ]  # fmt: skip
    for max_det in (n, 20):
        keep, keep_valid = _nms(
            boxes, scores, labels, valid, iou_threshold=iou_threshold, max_det=max_det,
            threshold_as_float64=True, chunk_size=chunk_size, page_size=page_size,
        )  # fmt: skip
        keep, keep_valid = np.asarray(keep), np.asarray(keep_valid)
        np.testing.assert_array_equal(keep[keep_valid], expected[:max_det])
    assert len(expected) > 20


def test_class_aware_nms_single_class_matches_torchvision_nms_and_plus_one_differs():
    rng = np.random.default_rng(3)
    n = 200
    xy = rng.uniform(0, 50, (n, 2))
    wh = rng.uniform(0.5, 20, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(F32)
    scores = rng.random(n).astype(F32)
    labels = np.zeros(n, np.int32)
    valid = np.ones(n, bool)
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    keep, keep_valid = _nms(
        boxes, scores, labels, valid, iou_threshold=0.5, max_det=n, threshold_as_float64=True
    )
    np.testing.assert_array_equal(np.asarray(keep)[np.asarray(keep_valid)], expected)
    # +1 widths: a plain sequential reference in float32.
    cands = [(scores[i], i, 0, boxes[i]) for i in range(n)]
    expected_plus_one = [c[1] for c in greedy_nms_reference(cands, 0.5, 1.0, n)]
    keep, keep_valid = _nms(
        boxes, scores, labels, valid, iou_threshold=0.5, max_det=n, legacy_plus_one=True
    )
    got = np.asarray(keep)[np.asarray(keep_valid)]
    np.testing.assert_array_equal(got, expected_plus_one)
    assert not np.array_equal(got, expected)  # the +1 convention changes the result here


def test_label_shift_matches_torchvision_batched_nms_where_it_changes_the_result():
    # 300 pairs of nested boxes with IoU within 2e-5 of 0.6 and labels 60..90: shifting by
    # label * (max + 1) ~ 6e4 rounds coordinates to ~0.008 and flips some decisions.
    rng = np.random.default_rng(5)
    pairs = 300
    xy = rng.uniform(0, 700, (pairs, 2))
    wh = rng.uniform(50, 300, (pairs, 2))
    ratio = 0.6 + rng.uniform(-2e-5, 2e-5, pairs)
    outer = np.concatenate([xy, xy + wh], 1)
    inner = np.concatenate([xy, xy + wh * np.stack([ratio, np.ones(pairs)], 1)], 1)
    boxes = np.concatenate([outer, inner]).astype(F32)
    scores = np.concatenate([rng.uniform(0.5, 1, pairs), rng.uniform(0, 0.5, pairs)]).astype(F32)
    labels = np.tile(rng.integers(60, 91, pairs), 2).astype(np.int32)
    valid = np.ones(2 * pairs, bool)
    expected = torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.6
    ).numpy()
    kw = dict(iou_threshold=0.6, max_det=2 * pairs, threshold_as_float64=True)
    keep, keep_valid = _nms(boxes, scores, labels, valid, shift_limit=1000, **kw)
    np.testing.assert_array_equal(np.asarray(keep)[np.asarray(keep_valid)], expected)
    keep, keep_valid = _nms(boxes, scores, labels, valid, **kw)
    assert not np.array_equal(np.asarray(keep)[np.asarray(keep_valid)], expected)
