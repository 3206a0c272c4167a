"""Detections of image files as JSON, drawings and raw head outputs (`core.predict_files`), on
the Python prediction API (`fcos_jax.inference.Detector`).

Command line: `python -m fcos_jax.predict --config C --checkpoint K [--output dets.json]
[--draw DIR] [--dump-head-outputs heads.npz] IMAGE...` (flags in `__main__.py`). Importing this
package defines no flags.
"""

from fcos_jax.predict.core import (
    detections_to_json,
    draw_paths,
    head_outputs_to_npz,
    predict_files,
)

__all__ = ["detections_to_json", "draw_paths", "head_outputs_to_npz", "predict_files"]
