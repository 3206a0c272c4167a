"""Test-time image preprocessing: decode, keep-ratio resize, normalise, pad to a multiple of 32.

Pure NumPy + cv2 (no TensorFlow, no torch): used by prediction and by the evaluation pipeline;
its size rules (`resized_size`), `scale` convention (`scale_yx`) and `normalise` are also those
of the training plan and transforms (fcos_jax/data).
Each `config.preprocess.resize` mode reproduces its reference exactly (docs/modes.md §2.3, §3.3
and §4.3):

  mmdet        mmcv `imread`/`imrescale`/`imnormalize`/`impad_to_multiple` (§2.3): BGR uint8
               from cv2, new size (int(w*s + 0.5), int(h*s + 0.5)) with
               s = min(long/max(h, w), short/min(h, w)), `cv2.resize` INTER_LINEAR on uint8,
               optional BGR->RGB, (x - mean) / std in float32, zero pad bottom/right.
  torchvision  `GeneralizedRCNNTransform` (§4.3): RGB float32 (/255 when `unit_range`),
               (x - mean) / std FIRST, then bilinear resize as torch's
               `interpolate(scale_factor=s, align_corners=False, recompute_scale_factor=True)`:
               output size floor(side * s), sampling ratio in/out; zero pad bottom/right.

Image arrays passed in are `[H, W, 3]` uint8 in **RGB** order (as TFDS, PIL and matplotlib give
them); `[H, W]`, `[H, W, 1]` (grey) and `[H, W, 4]` (RGBA, alpha dropped) are accepted too.
Files (paths) and encoded bytes are decoded with `cv2.imdecode(..., IMREAD_COLOR)` in every mode,
which also maps grey, alpha and 16-bit files to 8-bit BGR, as mmcv does.

The `scale` field is what post-processing divides resized-image boxes by, per axis (y, x), as
`preprocess.scale_factor` says (`fcos_jax/config/modes.py` pairs it with `test.postprocess`):
  single       (s, s): mmdet v1 divides by the single float scale factor (mmdet resize only).
  per_axis     (new_h / h, new_w / w): mmdet v2/v3 rescale each axis by its own factor;
               torchvision's `postprocess.detect` then rescales with float32(original / resized),
               as torchvision does, when given `original_hw`.
"""

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fcos_jax.config.modes import SCALE_FACTORS

RESIZE_MODES = ("mmdet", "torchvision")

ImageSource = str | Path | bytes | np.ndarray


# --------------------------------------------------------------------------------------------
# Reading


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Encoded image bytes -> [H, W, 3] uint8 BGR (`cv2.imdecode`, IMREAD_COLOR).

    Raises ValueError naming `name` when the bytes are not a decodable image."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
    if image is None:
        raise ValueError(f"{name}: cannot decode image ({len(data)} bytes; corrupt or unsupported)")
    return image


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> [H, W, 3] uint8 BGR. Raises FileNotFoundError / ValueError with the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return decode_image(path.read_bytes(), name=str(path))


def _array_to_rgb(image: np.ndarray, name: str) -> np.ndarray:
    """Validates a user array and returns it as [H, W, 3] uint8 RGB (C-contiguous)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, path or bytes, got {type(image)}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 image array (0-255), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"{name}: expected shape [H, W, 3] (RGB), got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name}: empty image of shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)


def load_bgr(image: ImageSource, name: str = "image") -> np.ndarray:
    """Any accepted source -> [H, W, 3] uint8 BGR. Arrays are taken as RGB (module docstring)."""
    if isinstance(image, str | Path):
        return read_image(image)
    if isinstance(image, bytes | bytearray | memoryview):
        return decode_image(bytes(image), name)
    return np.ascontiguousarray(_array_to_rgb(image, name)[:, :, ::-1])


def load_rgb(image: ImageSource, name: str = "image") -> np.ndarray:
    """Any accepted source -> [H, W, 3] uint8 RGB. Files are decoded by cv2, then BGR->RGB."""
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, name)
    return np.ascontiguousarray(load_bgr(image, name)[:, :, ::-1])


# --------------------------------------------------------------------------------------------
# Shared pieces


def pad_to_multiple(image: np.ndarray, divisor: int) -> np.ndarray:
    """Zero pad [H, W, C] at the bottom/right to the next multiple of `divisor` of each side."""
    if divisor < 1:
        raise ValueError(f"preprocess.size_divisor: expected >= 1, got {divisor}")
    h, w = image.shape[:2]
    pad_h, pad_w = -h % divisor, -w % divisor
    if pad_h == 0 and pad_w == 0:
        return image
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))


def check_modes(preprocess_config: Any) -> None:
    """ValueError naming the field unless `preprocess.resize` is a known mode, and RGB for the
    torchvision one."""
    p = preprocess_config
    if p.resize not in RESIZE_MODES:
        raise ValueError(f"preprocess.resize: expected one of {RESIZE_MODES}, got {p.resize!r}")
    if p.resize == "torchvision" and not p.to_rgb:
        raise ValueError("preprocess.to_rgb: the torchvision resize mode expects RGB (True)")


def single_scale(preprocess_config: Any) -> bool:
    """True when `preprocess.scale_factor` is 'single' (mmdet v1's one factor), False for
    'per_axis'; ValueError naming the field otherwise (module docstring, `scale`)."""
    factor = preprocess_config.scale_factor
    if factor not in SCALE_FACTORS:
        raise ValueError(
            f"preprocess.scale_factor: expected one of {SCALE_FACTORS}, got {factor!r}"
        )
    return factor == "single"


def normalize(pixels: Any, mean: Any, std: Any, unit_range: bool) -> Any:
    """(pixels [/ 255] - mean) / std in float32, in that order (mmcv `imnormalize`, torchvision
    `normalize`): the one normalisation of both modes, at test time here and in the training
    transforms (data/transforms.py). pixels: [..., 3] float32, a NumPy array or a TF tensor
    (operators only, so either computes the same floats); mean, std: 3 values, in the pixels'
    channel order. The division is skipped when every std is 1 (x / 1 is x)."""
    if unit_range:
        pixels = pixels / np.float32(255)
    pixels = pixels - np.asarray(mean, np.float32)
    if any(float(v) != 1 for v in std):
        pixels = pixels / np.asarray(std, np.float32)
    return pixels


def scale_yx(
    original_hw: Any, resized_hw: Any, factor: float, single_scale: bool
) -> tuple[float, float]:
    """(y, x) factors that map original to resized pixels (module docstring, `scale`):
    (factor, factor) for mmdet v1 (`single_scale`: one float), else (new_h / h, new_w / w) as
    mmdet v2+ and torchvision."""
    if single_scale:
        return factor, factor
    return resized_hw[0] / original_hw[0], resized_hw[1] / original_hw[1]


def _scale_sides(scale: Any) -> tuple[float, float]:
    """config.preprocess.scale (long side max, short side) in either order -> (long, short)."""
    if len(scale) != 2:
        raise ValueError(f"preprocess.scale: expected (long, short), got {scale}")
    return float(max(scale)), float(min(scale))


def _output(
    image: np.ndarray, resized_hw: tuple[int, int], factors: Any, original_hw: tuple[int, int]
) -> dict[str, np.ndarray]:
    return {
        "image": image,
        "image_hw": np.asarray(resized_hw, dtype=np.int32),
        "scale": np.asarray(factors, dtype=np.float64),
        "original_hw": np.asarray(original_hw, dtype=np.int32),
    }


# --------------------------------------------------------------------------------------------
# mmdet


def mmdet_rescale_size(h: int, w: int, scale: Any) -> tuple[int, int, float]:
    """mmcv `imrescale` size rule. Returns (new_h, new_w, scale_factor)."""
    long_side, short_side = _scale_sides(scale)
    factor = min(long_side / max(h, w), short_side / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5), factor


def check_resized_size(hw: Any, resized_hw: Any, scale: Any, name: str = "image") -> None:
    """ValueError naming the image when its keep-ratio size for `scale` is empty (a very long,
    thin image: 10 x 2000 at scale (1333, 800) in torchvision's floor rule)."""
    (h, w), (new_h, new_w) = hw, resized_hw
    if new_h < 1 or new_w < 1:
        raise ValueError(
            f"{name}: image of size {h}x{w} resizes to an empty {new_h}x{new_w} image "
            f"(preprocess.scale {tuple(scale)})"
        )


def resize_mmdet(image: np.ndarray, scale: Any, name: str = "image") -> tuple[np.ndarray, float]:
    """mmcv `imrescale` of one [H, W, C] uint8 image (any channel order: cv2 resizes each channel
    alike): `cv2.resize` INTER_LINEAR to `mmdet_rescale_size`. Returns (resized [h, w, C] uint8,
    the scale factor). The exported detectors (fcos_jax.export) take this image, RGB, as input.

    Raises ValueError naming `name` when the image resizes to nothing."""
    h, w = image.shape[:2]
    new_h, new_w, factor = mmdet_rescale_size(h, w, scale)
    check_resized_size((h, w), (new_h, new_w), scale, name)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR), factor


def preprocess_mmdet(
    image_bgr: np.ndarray,
    *,
    scale: Any = (1333, 800),
    mean: Any,
    std: Any,
    to_rgb: bool,
    unit_range: bool = False,
    size_divisor: int = 32,
    single_scale: bool = True,
    name: str = "image",
) -> dict[str, np.ndarray]:
    """mmdet test transform of one [H, W, 3] uint8 **BGR** image (`name` for error messages).

    unit_range: divide by 255 before normalising (no mmdet config does; kept for custom configs).
    single_scale: True (mmdet v1) gives `scale` = (s, s) with the float factor s; False
    (mmdet v2/v3) gives (new_h / h, new_w / w).
    Returns image [Hp, Wp, 3] float32 (padded), image_hw [2] int32 (resized, unpadded),
    scale [2] float64 (y, x), original_hw [2] int32."""
    h, w = image_bgr.shape[:2]
    resized, factor = resize_mmdet(image_bgr, scale, name)
    new_h, new_w = resized.shape[:2]
    if to_rgb:
        resized = resized[:, :, ::-1]
    normalized = normalize(resized.astype(np.float32), mean, std, unit_range)
    factors = scale_yx((h, w), (new_h, new_w), factor, single_scale)
    return _output(pad_to_multiple(normalized, size_divisor), (new_h, new_w), factors, (h, w))


# --------------------------------------------------------------------------------------------
# torchvision


def torchvision_resize_size(h: int, w: int, scale: Any) -> tuple[int, int, float]:
    """GeneralizedRCNNTransform size rule (min_size = short, max_size = long):
    s = min(short/min(h, w), long/max(h, w)); output floor(side * s). Returns (new_h, new_w, s)."""
    long_side, short_side = _scale_sides(scale)
    factor = min(short_side / min(h, w), long_side / max(h, w))
    return int(np.floor(h * factor)), int(np.floor(w * factor)), factor


def resized_size(h: int, w: int, scale: Any, resize_mode: str) -> tuple[int, int, float]:
    """Keep-ratio size of an h x w image for `scale` (long max, short) in `resize_mode`: mmdet
    int(x + 0.5) (`mmdet_rescale_size`), torchvision floor (`torchvision_resize_size`); the sizes
    the training plan and evaluation batches are made of. Returns (new_h, new_w, factor)."""
    if resize_mode == "mmdet":
        return mmdet_rescale_size(h, w, scale)
    if resize_mode == "torchvision":
        return torchvision_resize_size(h, w, scale)
    raise ValueError(f"preprocess.resize: expected one of {RESIZE_MODES}, got {resize_mode!r}")


def checked_resized_size(hw: Any, preprocess_config: Any, name: str = "image") -> tuple[int, int]:
    """(new_h, new_w) of an image of size hw = (h, w) under `config.preprocess`
    (`resized_size`); ValueError naming `name` when that is empty (`check_resized_size`). The
    size rule alone, for checks and plans that have no pixels."""
    p = preprocess_config
    h, w = int(hw[0]), int(hw[1])
    new_h, new_w, _ = resized_size(h, w, p.scale, p.resize)
    check_resized_size((h, w), (new_h, new_w), p.scale, name)
    return new_h, new_w


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear taps (align_corners=False, scale recomputed as in/out in float32).

    Returns (index0, index1, weight1) [out_size]: out[i] = in[i0]*(1-w1) + in[i1]*w1."""
    ratio = np.float32(in_size) / np.float32(out_size)
    # torch evaluates ratio * (i + 0.5) - 0.5 as one fused multiply-add in float32: exact in
    # float64 here, then rounded once (a float32 product would be off by up to 1.5e-5 at 256).
    centers = np.arange(out_size, dtype=np.float64) + 0.5
    source = np.maximum((np.float64(ratio) * centers - 0.5).astype(np.float32), np.float32(0))
    index0 = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    weight1 = np.clip(source - index0.astype(np.float32), 0, 1).astype(np.float32)
    index1 = index0 + (index0 < in_size - 1)
    return index0, index1, weight1


def resize_bilinear(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """[H, W, C] float32 -> [out_h, out_w, C] float32, torch `interpolate(mode='bilinear',
    align_corners=False)` with the output size given (what recompute_scale_factor=True does)."""
    out_h, out_w = out_hw
    h, w = image.shape[:2]
    y0, y1, wy = _linear_taps(h, out_h)
    x0, x1, wx = _linear_taps(w, out_w)
    wx, wy = wx[None, :, None], wy[:, None, None]
    one = np.float32(1)
    top, bottom = image[y0], image[y1]  # [out_h, W, C]
    top = top[:, x0] * (one - wx) + top[:, x1] * wx
    bottom = bottom[:, x0] * (one - wx) + bottom[:, x1] * wx
    return (top * (one - wy) + bottom * wy).astype(np.float32)


def preprocess_torchvision(
    image_rgb: np.ndarray,
    *,
    scale: Any = (1333, 800),
    mean: Any,
    std: Any,
    unit_range: bool = True,
    size_divisor: int = 32,
    name: str = "image",
) -> dict[str, np.ndarray]:
    """torchvision GeneralizedRCNNTransform (eval) of one [H, W, 3] uint8 **RGB** image (`name`
    for error messages).

    Returns image [Hp, Wp, 3] float32 (padded), image_hw [2] int32 (resized, unpadded),
    scale [2] float64 (new_h / h, new_w / w), original_hw [2] int32."""
    h, w = image_rgb.shape[:2]
    new_h, new_w, factor = torchvision_resize_size(h, w, scale)
    check_resized_size((h, w), (new_h, new_w), scale, name)
    normalized = normalize(image_rgb.astype(np.float32), mean, std, unit_range)
    resized = resize_bilinear(normalized, (new_h, new_w))
    factors = scale_yx((h, w), (new_h, new_w), factor, False)
    return _output(pad_to_multiple(resized, size_divisor), (new_h, new_w), factors, (h, w))


# --------------------------------------------------------------------------------------------
# Dispatch on the config


def preprocess(
    image: ImageSource, preprocess_config: Any, name: str = "image"
) -> dict[str, np.ndarray]:
    """One image (path, encoded bytes, or RGB uint8 array) -> network input and its geometry.

    preprocess_config: `config.preprocess` (its `scale_factor` decides the `scale` convention,
    module docstring). name: used in error messages.
    Returns image [Hp, Wp, 3] float32, image_hw [2] int32 (resized, unpadded),
    scale [2] float64 (y, x), original_hw [2] int32."""
    p = preprocess_config
    check_modes(p)
    common = {k: getattr(p, k) for k in ("scale", "mean", "std", "unit_range", "size_divisor")}
    if p.resize == "mmdet":
        return preprocess_mmdet(
            load_bgr(image, name),
            to_rgb=p.to_rgb,
            single_scale=single_scale(p),
            name=name,
            **common,
        )
    return preprocess_torchvision(load_rgb(image, name), name=name, **common)


def serving_image(
    image: ImageSource, preprocess_config: Any, name: str = "image"
) -> dict[str, np.ndarray]:
    """One image -> what the exported detectors (`fcos_jax.export`) take for it, before it is
    placed on their canvas.

    `mmdet` resize: image [h, w, 3] uint8 **RGB** resized by `resize_mmdet` (the artifact
    normalises it, in BGR order for caffe configs). `torchvision` resize: image [h, w, 3] float32,
    normalised and resized exactly as `preprocess_torchvision` does (torchvision normalises before
    its float resize, which a resized uint8 image cannot reproduce).
    image_hw [2] int32 = (h, w), scale [2] float64 (y, x) and original_hw [2] int32 as
    `preprocess` gives them."""
    p = preprocess_config
    check_modes(p)
    if p.resize == "torchvision":
        out = preprocess(image, p, name)
        new_h, new_w = (int(v) for v in out["image_hw"])
        out["image"] = out["image"][:new_h, :new_w]
        return out
    rgb = load_rgb(image, name)
    resized, factor = resize_mmdet(rgb, p.scale, name)
    original_hw, resized_hw = rgb.shape[:2], resized.shape[:2]
    factors = scale_yx(original_hw, resized_hw, factor, single_scale(p))
    return _output(resized, resized_hw, factors, original_hw)
