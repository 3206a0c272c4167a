"""Preprocessing against independent references: a direct cv2 transcription of mmcv's v1 test
transform (docs/modes.md §2.3) and torchvision's own GeneralizedRCNNTransform (§4.3)."""

import math

import cv2
import numpy as np
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from fcos_jax.config import base as config_base
from fcos_jax.data import preprocess
from fcos_jax.testing.images import natural_image

CAFFE_MEAN = (102.9801, 115.9465, 122.7717)
X101_MEAN, X101_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
TV_MEAN, TV_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZES = [(427, 640), (333, 500), (500, 333), (37, 61)]


def mmdet_v1_reference(bgr: np.ndarray, mean, std, to_rgb: bool):
    """mmcv 0.2 imrescale((1333, 800)) + imnormalize + impad_to_multiple(32), written out."""
    h, w = bgr.shape[:2]
    factor = min(1333 / max(h, w), 800 / min(h, w))
    new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
    img = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    if to_rgb:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    img = (img - np.array(mean, np.float32)) / np.array(std, np.float32)
    out = np.zeros((math.ceil(new_h / 32) * 32, math.ceil(new_w / 32) * 32, 3), np.float32)
    out[:new_h, :new_w] = img
    return out, (new_h, new_w), factor


def torchvision_reference(rgb: np.ndarray, scale=(1333, 800)):
    transform = GeneralizedRCNNTransform(min(scale), max(scale), TV_MEAN, TV_STD).eval()
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        batch, _ = transform([tensor])
    return batch.tensors[0].permute(1, 2, 0).numpy(), tuple(batch.image_sizes[0])


def mmdet_config(mean=CAFFE_MEAN, std=(1.0, 1.0, 1.0), to_rgb=False, scale_factor="single"):
    p = config_base.get_base_config().preprocess
    p.mean, p.std, p.to_rgb, p.scale_factor = mean, std, to_rgb, scale_factor
    return p


def torchvision_config(scale=(1333, 800)):
    p = config_base.get_base_config().preprocess
    p.resize, p.unit_range, p.to_rgb, p.scale_factor = "torchvision", True, True, "per_axis"
    p.mean, p.std, p.scale = TV_MEAN, TV_STD, scale
    return p


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("norm", ["caffe_bgr", "x101_rgb"])
def test_mmdet_path_matches_cv2_transcription_pixel_for_pixel(h, w, norm):
    rgb = natural_image(h, w, seed=h + w)
    mean, std, to_rgb = (
        (CAFFE_MEAN, (1.0, 1.0, 1.0), False) if norm == "caffe_bgr" else (X101_MEAN, X101_STD, True)
    )
    ref_image, ref_hw, ref_factor = mmdet_v1_reference(rgb[:, :, ::-1].copy(), mean, std, to_rgb)
    out = preprocess.preprocess(rgb, mmdet_config(mean, std, to_rgb))
    np.testing.assert_array_equal(out["image"], ref_image)
    assert tuple(out["image_hw"]) == ref_hw
    assert tuple(out["original_hw"]) == (h, w)
    assert tuple(out["scale"]) == (ref_factor, ref_factor)


def test_mmdet_v3_scale_is_per_axis_resized_over_original():
    rgb = natural_image(333, 500, seed=1)
    out = preprocess.preprocess(rgb, mmdet_config(scale_factor="per_axis"))
    new_h, new_w = int(333 * 800 / 333 + 0.5), int(500 * 800 / 333 + 0.5)
    assert tuple(out["image_hw"]) == (new_h, new_w) == (800, 1201)
    assert tuple(out["scale"]) == (new_h / 333, new_w / 500)


def test_mmdet_path_decodes_files_and_bytes_like_cv2_imread(tmp_path):
    rgb = natural_image(427, 640, seed=3)
    path = tmp_path / "img.jpg"
    cv2.imwrite(str(path), rgb[:, :, ::-1])
    ref_image, _, _ = mmdet_v1_reference(
        cv2.imread(str(path), cv2.IMREAD_COLOR), CAFFE_MEAN, (1, 1, 1), False
    )
    from_path = preprocess.preprocess(path, mmdet_config())
    from_bytes = preprocess.preprocess(path.read_bytes(), mmdet_config())
    np.testing.assert_array_equal(from_path["image"], ref_image)
    np.testing.assert_array_equal(from_bytes["image"], ref_image)


@pytest.mark.parametrize("h,w", SIZES)
def test_torchvision_path_matches_generalized_rcnn_transform(h, w):
    rgb = natural_image(h, w, seed=2 * h + w)
    ref_image, ref_hw = torchvision_reference(rgb)
    out = preprocess.preprocess(rgb, torchvision_config())
    assert out["image"].shape == ref_image.shape
    np.testing.assert_allclose(out["image"], ref_image, rtol=0, atol=1e-5)
    assert tuple(out["image_hw"]) == ref_hw
    assert tuple(out["scale"]) == (ref_hw[0] / h, ref_hw[1] / w)


def test_torchvision_path_with_a_smaller_scale_matches_the_transform():
    rgb = natural_image(333, 500, seed=7)
    ref_image, ref_hw = torchvision_reference(rgb, scale=(512, 320))
    out = preprocess.preprocess(rgb, torchvision_config(scale=(512, 320)))
    np.testing.assert_allclose(out["image"], ref_image, rtol=0, atol=1e-5)
    assert tuple(out["image_hw"]) == ref_hw


def test_resize_bilinear_matches_torch_interpolate_on_upsampling_and_downsampling():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(57, 83, 3)).astype(np.float32)
    for out_hw in [(130, 171), (20, 31), (57, 83), (1, 1)]:
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None], size=out_hw, mode="bilinear",
            align_corners=False,
        )[0].permute(1, 2, 0).numpy()  # fmt: skip
        np.testing.assert_allclose(preprocess.resize_bilinear(image, out_hw), ref, atol=1e-6)


def _write_png(path, array):
    assert cv2.imwrite(str(path), array)
    return path


@pytest.mark.parametrize("kind", ["gray", "rgba", "gray16", "rgb16"])
def test_gray_alpha_and_16bit_files_decode_to_8bit_color_like_cv2(tmp_path, kind):
    rgb = natural_image(61, 90, seed=11)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    arrays = {
        "gray": gray,
        "rgba": np.dstack([rgb[:, :, ::-1], np.full(gray.shape, 77, np.uint8)]),
        "gray16": gray.astype(np.uint16) * 257 + 3,
        "rgb16": rgb[:, :, ::-1].astype(np.uint16) * 257,
    }
    path = _write_png(tmp_path / f"{kind}.png", arrays[kind])
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr.dtype == np.uint8 and bgr.shape == (61, 90, 3)
    ref_mmdet, _, _ = mmdet_v1_reference(bgr, CAFFE_MEAN, (1, 1, 1), False)
    np.testing.assert_array_equal(preprocess.preprocess(path, mmdet_config())["image"], ref_mmdet)
    ref_tv, _ = torchvision_reference(bgr[:, :, ::-1].copy())
    np.testing.assert_allclose(
        preprocess.preprocess(path, torchvision_config())["image"], ref_tv, atol=1e-5
    )


def test_gray_and_rgba_arrays_become_three_channel_rgb():
    rgb = natural_image(40, 50, seed=5)
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(preprocess.load_rgb(gray), np.dstack([gray] * 3))
    rgba = np.dstack([rgb, np.zeros_like(gray)])
    np.testing.assert_array_equal(preprocess.load_rgb(rgba), rgb)
    np.testing.assert_array_equal(preprocess.load_bgr(rgb), rgb[:, :, ::-1])


def test_corrupt_file_error_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        preprocess.preprocess(path, mmdet_config())
    with pytest.raises(ValueError, match="broken.jpg"):
        preprocess.preprocess(path, torchvision_config())


def test_missing_file_and_bad_arrays_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        preprocess.preprocess(tmp_path / "nowhere.png", mmdet_config())
    with pytest.raises(ValueError, match="uint8"):
        preprocess.preprocess(np.zeros((8, 8, 3), np.float32), mmdet_config())
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        preprocess.preprocess(np.zeros((8, 8, 5), np.uint8), mmdet_config())
    bad = mmdet_config()
    bad.resize = "bicubic"
    with pytest.raises(ValueError, match="preprocess.resize"):
        preprocess.preprocess(np.zeros((8, 8, 3), np.uint8), bad)
