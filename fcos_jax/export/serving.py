"""The serving function: the whole detector as one pure JAX function of the serving signature.

Inputs (B images on one canvas H x W; B may be symbolic):
  images       [B, H, W, 3] uint8 RGB, each resized image at the top left, zero padded
               (`preprocess.serving_image`); float32 already normalised for `torchvision` configs.
  image_hw     [B, 2] int32 (h, w) of each resized image (the valid area).
  original_hw  [B, 2] int32 (height, width) of each original image.
  scale        [B, 2] float32 (y, x) factors; original pixels = resized pixels / scale.
Outputs (D = test.max_per_img rows, sorted by score, rows past num_detections zero / -1):
  boxes [B, D, 4] float32 xyxy in original pixels, scores [B, D] float32,
  classes [B, D] int32 dataset category ids (-1 in empty rows), num_detections [B] int32.

Inside: channel order (BGR for caffe configs), (x [/ 255] - mean) / std, the area outside
image_hw zeroed after normalising (as the references pad), the model, and `postprocess.detect`
with the config's mode and thresholds (exact greedy NMS). The weights are constants of the
function. Nothing here imports TensorFlow or jax2onnx.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fcos_jax.data import canvas, preprocess
from fcos_jax.detection import postprocess
from fcos_jax.inference import Detector

INPUT_NAMES = ("images", "image_hw", "original_hw", "scale")
# In the order the outputs flatten (a dict flattens by sorted key).
OUTPUT_NAMES = ("boxes", "classes", "num_detections", "scores")

ServingFunction = Callable[..., dict[str, jax.Array]]


def takes_normalised_images(config: Any) -> bool:
    """True when `images` is float32 normalised (torchvision resize), False for uint8 RGB."""
    return config.preprocess.resize == "torchvision"


def default_canvas(config: Any) -> tuple[int, int]:
    """The landscape canvas (H, W) of `preprocess.scale` rounded up to `size_divisor`
    (800 x 1344 for (1333, 800))."""
    scale = tuple(int(v) for v in config.preprocess.scale)
    divisor = int(config.preprocess.size_divisor)
    return canvas.default_canvases([(max(scale), min(scale))], divisor)[0]


def check_canvas(config: Any, canvas_hw: tuple[int, int]) -> None:
    """ValueError unless both canvas sides are positive multiples of preprocess.size_divisor."""
    divisor = int(config.preprocess.size_divisor)
    if len(canvas_hw) != 2 or any(int(side) < 1 or int(side) % divisor for side in canvas_hw):
        raise ValueError(
            f"canvas: height and width must be positive multiples of preprocess.size_divisor "
            f"({divisor}), got {tuple(canvas_hw)}"
        )


def _divide(x: jax.Array, divisor: jax.Array) -> jax.Array:
    """x / divisor as a true IEEE division, as NumPy does in `preprocess` (without the barrier
    XLA may multiply by the reciprocal instead, 1 ulp off for some values)."""
    return x / lax.optimization_barrier(jnp.broadcast_to(divisor, x.shape))


def network_input(images: jax.Array, image_hw: jax.Array, preprocess_config: Any) -> jax.Array:
    """Serving `images` [B, H, W, 3] -> the network input [B, H, W, 3] float32 that `preprocess`
    gives (normalised in the config's channel order), zero outside each image_hw [B, 2]."""
    p = preprocess_config
    x = images.astype(jnp.float32)
    if p.resize != "torchvision":  # torchvision: normalised outside (preprocess.serving_image)
        if not p.to_rgb:
            x = x[..., ::-1]  # RGB -> BGR (caffe)
        if p.unit_range:
            x = _divide(x, jnp.float32(255))
        x = _divide(x - jnp.asarray(p.mean, jnp.float32), jnp.asarray(p.std, jnp.float32))
    rows = jnp.arange(x.shape[1])[None, :, None] < image_hw[:, 0, None, None]
    cols = jnp.arange(x.shape[2])[None, None, :] < image_hw[:, 1, None, None]
    return jnp.where((rows & cols)[..., None], x, jnp.float32(0))


def serving_function(
    detector: Detector, *, sort_top_k: bool = False, weights_barrier: bool = True
) -> ServingFunction:
    """`serve(images, image_hw, original_hw, scale) -> {boxes, classes, num_detections, scores}`
    of `detector`'s config, weights and class list (module docstring).

    sort_top_k: see `postprocess.detect` (for TF's StableHLO reader). weights_barrier: pass the
    baked-in weights through an optimization barrier, so that XLA compiles them as it compiles
    `Detector`'s weight arguments and the detections are equal bit for bit; without it XLA folds
    constant arithmetic (BN scales into kernels, ...) and rounds differently (1e-5 in the head
    outputs). ONNX goes without: jax2onnx 0.17.1 writes the barrier's Identity nodes over
    initializers in an order onnxruntime rejects."""
    config, variables = detector.config, detector.variables
    options = postprocess.options_from_config(config)
    category_ids = np.asarray([cid for cid, _ in detector.classes], np.int32)

    def serve(images, image_hw, original_hw, scale):
        image_hw = image_hw.astype(jnp.int32)
        x = network_input(images, image_hw, config.preprocess)
        weights = lax.optimization_barrier(variables) if weights_barrier else variables
        head_outputs = detector.model.apply(weights, x)
        dets = postprocess.detect(
            head_outputs,
            image_hw,
            scale.astype(jnp.float32),
            original_hw=original_hw.astype(jnp.int32),
            sort_top_k=sort_top_k,
            **options,
        )
        valid = dets["valid"]
        return {
            "boxes": dets["boxes"],
            "classes": jnp.where(valid, jnp.asarray(category_ids)[dets["labels"]], -1),
            "num_detections": jnp.sum(valid.astype(jnp.int32), axis=1),
            "scores": dets["scores"],
        }

    return serve


def input_specs(
    config: Any, canvas_hw: tuple[int, int], batch: int | Any
) -> list[jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of the inputs, in INPUT_NAMES order, for a batch size (an int or a
    `jax.export` symbolic dimension)."""
    height, width = canvas_hw
    image_dtype = jnp.float32 if takes_normalised_images(config) else jnp.uint8
    return [
        jax.ShapeDtypeStruct((batch, height, width, 3), image_dtype),
        jax.ShapeDtypeStruct((batch, 2), jnp.int32),
        jax.ShapeDtypeStruct((batch, 2), jnp.int32),
        jax.ShapeDtypeStruct((batch, 2), jnp.float32),
    ]


def serving_inputs(
    images: Sequence[preprocess.ImageSource], config: Any, canvas_hw: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Images (paths, bytes or RGB arrays) -> the inputs of an artifact with this canvas: each
    `preprocess.serving_image` at the top left of a zero canvas. ValueError naming the image
    when it does not fit the canvas."""
    height, width = canvas_hw
    dtype = np.float32 if takes_normalised_images(config) else np.uint8
    batch = {
        "images": np.zeros((len(images), height, width, 3), dtype),
        "image_hw": np.zeros((len(images), 2), np.int32),
        "original_hw": np.zeros((len(images), 2), np.int32),
        "scale": np.zeros((len(images), 2), np.float32),
    }
    for i, image in enumerate(images):
        name = str(image) if isinstance(image, str) else f"images[{i}]"
        item = preprocess.serving_image(image, config.preprocess, name)
        batch["images"][i] = canvas.pad_to(item["image"], canvas_hw, name)
        batch["image_hw"][i] = item["image_hw"]
        batch["original_hw"][i] = item["original_hw"]
        batch["scale"][i] = item["scale"]
    return batch
