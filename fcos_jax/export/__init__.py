"""The whole detector (normalisation, model, decoding, thresholds, exact NMS) as one serving
artifact: StableHLO (`jax.export`), TF SavedModel (`jax2tf`) or ONNX (`jax2onnx`).

  serving.py  the serving function and its signature (pure JAX), the client-side inputs
  writers.py  one writer per format (TensorFlow and jax2onnx are imported there, when used)

Command line: `python -m fcos_jax.export --config C --checkpoint K --format
stablehlo|savedmodel|onnx --output OUT [--batch N] [--height H --width W]`. What a client passes
and gets: `serving.py`'s docstring and docs/export.md. Importing this package
imports neither TensorFlow nor jax2onnx.
"""

from fcos_jax.export.serving import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    canvas_note,
    check_canvas,
    default_canvas,
    serving_function,
    serving_inputs,
    takes_normalized_images,
)
from fcos_jax.export.writers import FORMATS, check_platforms, export_detector

__all__ = [
    "FORMATS",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "canvas_note",
    "check_canvas",
    "check_platforms",
    "default_canvas",
    "export_detector",
    "serving_function",
    "serving_inputs",
    "takes_normalized_images",
]
