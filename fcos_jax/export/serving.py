"""The serving function: the whole detector as one pure JAX function of the serving signature.

Inputs (B images on one canvas H x W; B may be symbolic):
  images       [B, H, W, 3] each resized image at the top left, zero padded
               (`preprocess.serving_image`): uint8 RGB for `mmdet` resize configs, float32
               already normalised for `torchvision` ones (their normalisation precedes the resize).
  image_hw     [B, 2] int32 (h, w) of each resized image (the valid area).
  original_hw  [B, 2] int32 (height, width) of each original image.
  scale        [B, 2] float32 (y, x) resize factors. Read by `mmdet_v1` configs only (original
               pixels = resized pixels / scale, scale = (s, s)); `mmdet_v3` and `torchvision`
               rescale per axis by float32(original_hw / image_hw), as Detector does.
Outputs (D = test.max_per_img rows, sorted by score, rows past num_detections zero / -1):
  boxes [B, D, 4] float32 xyxy in original pixels, scores [B, D] float32,
  classes [B, D] int32 dataset category ids (-1 in empty rows), num_detections [B] int32,
  refused [B] bool: True where image_hw is not within 1..H x 1..W (a client's resize does not
  match the canvas); such a row has no detections (num_detections 0).

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
OUTPUT_NAMES = ("boxes", "classes", "num_detections", "refused", "scores")

ServingFunction = Callable[..., dict[str, jax.Array]]


def takes_normalized_images(config: Any) -> bool:
    """True when `images` is float32 normalised (torchvision resize), False for uint8 RGB."""
    return config.preprocess.resize == "torchvision"


def default_canvas(config: Any) -> tuple[int, int]:
    """The landscape canvas (H, W) of `preprocess.scale` rounded up to `size_divisor`
    (800 x 1344 for (1333, 800)): `canvas.scale_canvases`' first."""
    return canvas.scale_canvases(config)[0]


def canvas_note(config: Any, canvas_hw: tuple[int, int]) -> str | None:
    """None when canvas_hw is one of `Detector`'s canvases for this config (landscape or
    portrait of `preprocess.scale`), else why the artifact will not detect what Detector
    detects (export prints it as a warning)."""
    canvases = canvas.scale_canvases(config)
    if tuple(int(s) for s in canvas_hw) in canvases:
        return None
    named = " and ".join(f"{h}x{w}" for h, w in canvases)
    return (
        f"canvas {canvas_hw[0]}x{canvas_hw[1]} is not a canvas of preprocess.scale "
        f"{tuple(config.preprocess.scale)} ({named}): the artifact's detections differ from "
        f"Detector's near the padding, and it refuses images resized beyond it; to serve "
        f"another resolution set --config.preprocess.scale instead"
    )


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
    """`serve(images, image_hw, original_hw, scale) -> {boxes, classes, num_detections, refused,
    scores}` of `detector`'s config, weights and class list (module docstring).

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
        # A client whose resize disagrees with the canvas would get detections of a cut image
        # or of padding; the row is answered with none and flagged, in every runtime alike.
        height, width = images.shape[1:3]
        refused = jnp.any(image_hw < 1, axis=1) | (image_hw[:, 0] > height)
        refused = refused | (image_hw[:, 1] > width)
        valid = dets["valid"] & ~refused[:, None]
        return {
            "boxes": jnp.where(valid[..., None], dets["boxes"], jnp.float32(0)),
            "classes": jnp.where(valid, jnp.asarray(category_ids)[dets["labels"]], -1),
            "num_detections": jnp.sum(valid.astype(jnp.int32), axis=1),
            "refused": refused,
            "scores": jnp.where(valid, dets["scores"], jnp.float32(0)),
        }

    return serve


def input_specs(
    config: Any, canvas_hw: tuple[int, int], batch: int | Any
) -> list[jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of the inputs, in INPUT_NAMES order, for a batch size (an int or a
    `jax.export` symbolic dimension)."""
    height, width = canvas_hw
    image_dtype = jnp.float32 if takes_normalized_images(config) else jnp.uint8
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
    dtype = np.float32 if takes_normalized_images(config) else np.uint8
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
