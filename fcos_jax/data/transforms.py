"""Training pixel transforms in TF ops (docs/modes.md §2.7, §4.7): one encoded image -> the
normalised, resized, flipped image at the top left of its canvas, inside the tf.data graph.

Order, as mmdet v1 `CustomDataset.prepare_train_img` + `ImageTransform`: decode (RGB or BGR per
config) -> keep-ratio resize to a planned size -> (mmdet: round to uint8 as cv2 does) ->
normalise (`preprocess.normalise`, the function of the test-time path) -> horizontal flip -> zero
pad bottom/right into the canvas; torchvision normalises before its float resize. The sizes,
scale and flip are decided by the epoch plan (epoch_plan.py) and the boxes placed in NumPy
(geometry.py) on the host, so the TF graph only executes them.

The evaluation path does not use this module: it calls `fcos_jax.data.preprocess.preprocess`, the
function `predict` uses (pixel-exact cv2 for the mmdet modes). Here the mmdet mode decodes JPEGs
with the accurate integer IDCT (the same pixels as cv2.imdecode) and resizes with
`tf.image.resize` bilinear (half-pixel centres, no antialiasing), within 1 grey level of cv2
INTER_LINEAR on uint8. The channel swap and the flip are applied to the decoded image, before the
resize: bilinear sampling with half-pixel centres is mirror-symmetric, so this equals mmdet's flip
after resize and normalisation, and costs less.
"""

from typing import Any

import tensorflow as tf

from fcos_jax.data import preprocess


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded bytes -> [H, W, 3] uint8 RGB. JPEGs use the accurate integer IDCT (libjpeg's
    default, so the pixels equal cv2.imdecode's); PNG/GIF/BMP through tf.io.decode_image."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False),
    )


def train_image(
    encoded: tf.Tensor,
    original_hw: tf.Tensor,
    resized_hw: tf.Tensor,
    flip: tf.Tensor,
    canvas_hw: tf.Tensor,
    preprocess_config: Any,
) -> tf.Tensor:
    """One training image: [Hc, Wc, 3] float32, the resized image at the top left of the canvas.

    encoded: [] string; original_hw, resized_hw, canvas_hw: [2] int32 (h, w); flip: [] bool.
    preprocess_config: `config.preprocess` (resize mode, mean, std, to_rgb, unit_range)."""
    p = preprocess_config
    preprocess.check_modes(p)
    image = decode_image(encoded)
    tf.debugging.assert_equal(
        tf.shape(image)[:2], original_hw, message="decoded image size differs from the index"
    )
    # Channel order and flip are applied to the small decoded image: bilinear sampling with
    # half-pixel centres is mirror-symmetric, so flipping before the resize equals flipping after.
    if not p.to_rgb:
        image = tf.reverse(image, axis=[-1])  # several times faster than image[..., ::-1]
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)

    if p.resize == "mmdet":
        # cv2 resizes uint8 to uint8: round (a convex combination of 0..255 needs no clipping).
        pixels = tf.round(tf.image.resize(image, resized_hw, method="bilinear", antialias=False))
        pixels = preprocess.normalize(pixels, p.mean, p.std, p.unit_range)
    else:  # torchvision: normalise, then resize the float image
        pixels = preprocess.normalize(tf.cast(image, tf.float32), p.mean, p.std, p.unit_range)
        pixels = tf.image.resize(pixels, resized_hw, method="bilinear", antialias=False)
    pad = canvas_hw - resized_hw
    return tf.pad(pixels, [[0, pad[0]], [0, pad[1]], [0, 0]])
