"""Training transforms against docs/modes.md §2.7 written out with cv2/NumPy (torch for
torchvision mode, §4.7)."""

import collections

import cv2
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
from data_helpers import encode, natural_image

from fcos_jax.data import epoch_plan, examples, geometry, preprocess, transforms

CAFFE_MEAN = (102.9801, 115.9465, 122.7717)
TV_MEAN, TV_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _pre(**kw):
    base = dict(resize="mmdet", mean=CAFFE_MEAN, std=(1.0, 1.0, 1.0), to_rgb=False)
    return ml_collections.ConfigDict({**base, "unit_range": False, **kw})


def _v1_size(h, w, long_side, short_side):
    """mmcv imrescale: s = min(long/max, short/min); (int(h*s + 0.5), int(w*s + 0.5))."""
    s = min(long_side / max(h, w), short_side / min(h, w))
    return int(h * s + 0.5), int(w * s + 0.5)


@pytest.mark.parametrize(
    ("hw", "scale", "expected"),
    [
        ((480, 640), (1333, 800), (800, 1067)),
        ((427, 640), (1333, 800), (800, 1199)),
        ((640, 427), (1333, 640), (959, 640)),
        ((300, 1200), (1333, 800), (333, 1333)),
        ((256, 300), (320, 320), (273, 320)),
    ],
)
def test_mmdet_resized_size_follows_v1_rounding(hw, scale, expected):
    nh, nw, factor = preprocess.resized_size(*hw, scale, "mmdet")
    assert (nh, nw) == expected == _v1_size(*hw, *scale)
    assert factor == min(scale[0] / max(hw), scale[1] / min(hw))


def test_torchvision_resized_size_floors():
    for h, w in [(480, 640), (427, 640), (333, 500), (37, 61)]:
        s = min(800 / min(h, w), 1333 / max(h, w))
        nh, nw, _ = preprocess.resized_size(h, w, (1333, 800), "torchvision")
        assert (nh, nw) == (int(np.floor(h * s)), int(np.floor(w * s)))


def _cv2_train_image(data, resized_hw, flip, canvas_hw, mean, std, to_rgb):
    """docs/modes.md §2.7 with cv2: imread (BGR), resize INTER_LINEAR uint8, normalise, flip, zero
    pad."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    img = cv2.resize(img, resized_hw[::-1], interpolation=cv2.INTER_LINEAR)
    if to_rgb:
        img = img[..., ::-1]
    img = (img.astype(np.float32) - np.float32(mean)) / np.float32(std)
    if flip:
        img = img[:, ::-1]
    out = np.zeros((*canvas_hw, 3), np.float32)
    out[: resized_hw[0], : resized_hw[1]] = img
    return out


def _tf_train_image(data, hw, resized_hw, flip, canvas_hw, pre):
    return transforms.train_image(
        tf.constant(data),
        tf.constant(hw, tf.int32),
        tf.constant(resized_hw, tf.int32),
        tf.constant(flip),
        tf.constant(canvas_hw, tf.int32),
        pre,
    ).numpy()


@pytest.mark.parametrize(
    ("hw", "scale", "flip"),
    [((96, 128), (320, 192), False), ((96, 128), (320, 192), True), ((150, 110), (100, 64), True)],
)
def test_mmdet_train_image_is_within_one_level_of_cv2(hw, scale, flip):
    data = encode(natural_image(*hw, seed=hw[0]), "JPEG", quality=92)
    nh, nw, _ = preprocess.resized_size(*hw, scale, "mmdet")
    canvas = (-(-max(nh, nw) // 32) * 32,) * 2
    got = _tf_train_image(data, hw, (nh, nw), flip, canvas, _pre())
    want = _cv2_train_image(data, (nh, nw), flip, canvas, CAFFE_MEAN, (1, 1, 1), False)
    assert got.shape == want.shape == (*canvas, 3)
    assert np.abs(got - want).max() <= 1.0 + 1e-4
    assert np.mean(got != want) < 0.3  # mostly identical, not merely close
    assert not got[nh:].any() and not got[:, nw:].any()  # zero padding bottom/right


def test_mmdet_rgb_imagenet_normalization_matches_cv2():
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    data = encode(natural_image(64, 80, 3), "PNG")
    pre = _pre(mean=mean, std=std, to_rgb=True)
    got = _tf_train_image(data, (64, 80), (80, 100), False, (96, 128), pre)
    want = _cv2_train_image(data, (80, 100), False, (96, 128), mean, std, True)
    assert np.abs(got - want).max() <= 1.0 / min(std) + 1e-5


def test_torchvision_train_image_matches_torch_interpolate():
    """GeneralizedRCNNTransform order: /255, normalise, then bilinear (align_corners=False)."""
    rgb = natural_image(90, 70, 5)
    data = encode(rgb, "PNG")
    pre = _pre(resize="torchvision", mean=TV_MEAN, std=TV_STD, to_rgb=True, unit_range=True)
    nh, nw, s = preprocess.resized_size(90, 70, (200, 120), "torchvision")
    got = _tf_train_image(data, (90, 70), (nh, nw), True, (160, 128), pre)
    x = (torch.from_numpy(rgb).float() / 255 - torch.tensor(TV_MEAN)) / torch.tensor(TV_STD)
    x = F.interpolate(
        x.permute(2, 0, 1)[None], scale_factor=s, mode="bilinear", recompute_scale_factor=True
    )[0].permute(1, 2, 0)
    want = np.zeros((160, 128, 3), np.float32)
    want[:nh, :nw] = x.numpy()[:, ::-1]
    assert x.shape[:2] == (nh, nw)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_decoded_image_size_must_match_the_index():
    data = encode(natural_image(20, 30, 1), "PNG")
    with pytest.raises(tf.errors.InvalidArgumentError, match="differs from the index"):
        _tf_train_image(data, (30, 20), (20, 30), False, (32, 32), _pre())


@pytest.mark.parametrize("kind", ["jpeg", "jpeg444", "gray_jpeg", "png"])
def test_decode_image_equals_cv2_imdecode(kind):
    rgb = natural_image(48, 64, 9)
    data = {
        "jpeg": encode(rgb, "JPEG", quality=85),
        "jpeg444": encode(rgb, "JPEG", quality=95, subsampling=0),
        "gray_jpeg": encode(rgb[..., 1], "JPEG"),
        "png": encode(rgb, "PNG"),
    }[kind]
    got = transforms.decode_image(tf.constant(data)).numpy()
    want = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------------
# Ground truth


def test_clean_annotations_drops_crowd_clips_and_drops_thin_boxes_legacy():
    xywh = np.array(
        [
            [10, 20, 30, 40],  # fine: x2 = 39, y2 = 59
            [90, 5, 20, 10],  # reaches past W = 100: x2 = 109 -> 99
            [5, 5, 10, 10],  # crowd
            [30, 10, 0.5, 5],  # w < 1
            [-4, -2, 10, 6],  # clipped to x1 = y1 = 0
            [100, 10, 5, 5],  # entirely right of the image (x1 = W)
            [98.5, 10, 5, 5],  # clipped to x1 = 98.5, x2 = 99: w = 1.5
        ],
        np.float32,
    )
    crowd = np.array([0, 0, 1, 0, 0, 0, 0], bool)
    counts = collections.Counter()
    boxes, labels = examples.clean_annotations(
        xywh, [5, 7, 5, 5, 7, 5, 5], crowd, (80, 100), {5: 0, 7: 1}, True, counts, "img"
    )
    np.testing.assert_array_equal(
        boxes, [[10, 20, 39, 59], [90, 5, 99, 14], [0, 0, 5, 3], [98.5, 10, 99, 14]]
    )
    assert labels.tolist() == [0, 1, 1, 0]
    assert counts == {
        "crowd_boxes_dropped": 1,
        "boxes_clipped": 3,
        "small_boxes_dropped": 1,
        "boxes_outside_dropped": 1,
    }


def test_boxes_of_negative_width_or_height_are_counted_as_such():
    """Not as outside the image or too small, which a negative width also makes them look."""
    xywh = np.array(
        [
            [50, 10, -60, 20],  # x2 = -11: also left of the image
            [20, 10, -5, 20],  # inside, but x2 < x1
            [20, 10, 5, -3],  # negative height
            [20, 10, 5, 5],  # fine
        ],
        np.float32,
    )
    counts = collections.Counter()
    boxes, _ = examples.clean_annotations(
        xywh, [1] * 4, [False] * 4, (80, 100), {1: 0}, False, counts, "img"
    )
    np.testing.assert_array_equal(boxes, [[20, 10, 25, 15]])
    assert counts == {"boxes_negative_size_dropped": 3}


def test_clean_annotations_without_legacy_clips_to_the_image_size():
    counts = collections.Counter()
    boxes, _ = examples.clean_annotations(
        np.array([[90, 5, 20, 10]], np.float32), [1], [False], (80, 100), {1: 0}, False, counts, ""
    )
    np.testing.assert_array_equal(boxes, [[90, 5, 100, 15]])


def test_unknown_category_is_an_error_naming_the_image():
    with pytest.raises(ValueError, match="image id 4: category id 3 is not in the class list"):
        examples.clean_annotations(
            np.ones((1, 4)), [3], [False], (9, 9), {1: 0}, True, collections.Counter(), "image id 4"
        )


def test_transform_boxes_scales_flips_with_plus_one_and_clips():
    boxes = np.array([[10, 20, 29, 39], [0, 0, 49, 9]], np.float32)
    # scale 2 -> [20, 40, 58, 78], [0, 0, 98, 18]; flip in W = 100 with +1: x1' = 100 - x2 - 1
    got = geometry.transform_boxes(boxes, (2.0, 2.0), True, (60, 100), True)
    np.testing.assert_allclose(got, [[41, 40, 79, 59], [1, 0, 99, 18]])
    got = geometry.transform_boxes(boxes, (2.0, 2.0), True, (60, 100), False)
    np.testing.assert_allclose(got, [[42, 40, 80, 60], [2, 0, 100, 18]])
    got = geometry.transform_boxes(boxes, (0.5, 2.0), False, (60, 100), False)
    np.testing.assert_allclose(got, [[20, 10, 58, 19.5], [0, 0, 98, 4.5]])


def test_keep_largest_keeps_the_biggest_boxes_in_input_order():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 9, 9], [0, 0, 4, 4], [0, 0, 9, 9]], np.float32)
    kept, labels = examples.keep_largest(boxes, np.arange(4), 2, True)
    assert labels.tolist() == [1, 3]
    kept, labels = examples.keep_largest(boxes, np.arange(4), 3, False)
    assert labels.tolist() == [1, 2, 3]


def test_pad_boxes_marks_padding_invalid():
    boxes, labels, valid = geometry.pad_boxes(np.ones((2, 4)), np.array([3, 1]), 4)
    assert boxes.shape == (4, 4) and boxes.dtype == np.float32 and labels.dtype == np.int32
    assert valid.tolist() == [True, True, False, False]
    assert not boxes[2:].any() and labels.tolist() == [3, 1, 0, 0]
    with pytest.raises(ValueError, match="data.max_boxes"):
        geometry.pad_boxes(np.ones((5, 4)), np.zeros(5), 4)


# --------------------------------------------------------------------------------------------
# Scales


def test_value_mode_picks_one_of_the_listed_scales_uniformly():
    rng = np.random.default_rng(0)
    scales = epoch_plan.check_multiscale(((1333, 640), (800, 1333)), "value")
    assert scales == [(1333, 640), (1333, 800)]
    drawn = epoch_plan.sample_scales(rng, 4000, scales, "value")
    values, counts = np.unique(drawn, axis=0, return_counts=True)
    assert values.tolist() == [[1333, 640], [1333, 800]]
    assert abs(counts[0] / 4000 - 0.5) < 0.03


def test_range_mode_draws_edges_between_the_two_scales_inclusive():
    rng = np.random.default_rng(1)
    scales = epoch_plan.check_multiscale(((1333, 640), (1333, 800)), "range")
    drawn = epoch_plan.sample_scales(rng, 5000, scales, "range")
    assert (drawn[:, 0] == 1333).all()
    assert drawn[:, 1].min() == 640 and drawn[:, 1].max() == 800
    assert len(np.unique(drawn[:, 1])) > 150
    assert epoch_plan.largest_scales(scales, "range") == [(1333, 800)]


@pytest.mark.parametrize(
    ("scales", "mode", "message"),
    [
        (((1333, 800),), "ranges", "augment.multiscale_mode"),
        ((), "value", "at least one scale"),
        (((1333, 800),), "range", "two scales"),
        (((1333,),), "value", r"\(long, short\)"),
    ],
)
def test_bad_multiscale_settings_name_the_field(scales, mode, message):
    with pytest.raises(ValueError, match=message):
        epoch_plan.check_multiscale(scales, mode)
