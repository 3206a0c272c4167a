"""Our FCOS against a PyTorch reference on one image, from the same PyTorch checkpoint.

  errors.py      CompareError (the comparison cannot run) and ReferenceWeightsError
  checks.py      the tolerances, per-level head differences, detection matching
  references.py  the mmdet and torchvision references on one image (`ReferenceRun`)
  core.py        `compare` (a checkpoint file through both sides) and `report` (prints, judges)

The torch oracles, which compare and the tests use (imported only where used, so this package
brings no torch):
  mmdet_reference.py     mmdetection's FCOS test path written in torch
  torchvision_random.py  torchvision's FCOS with seeded random weights in which nothing is an
                         identity (parity inputs of the tests and benchmarks)

Command line: `python -m fcos_jax.compare --format {mmdet,torchvision} --config C --input FILE.pth
[--checkpoint DIR] IMAGE` (flags in `__main__.py`). Importing this package defines no flags and
imports neither torch nor TensorFlow.
"""

from fcos_jax.compare.checks import (
    BOX_ATOL,
    HEAD_RTOL,
    INPUT_ATOL,
    SCORE_ATOL,
    level_differences,
    match_detections,
)
from fcos_jax.compare.core import compare, report
from fcos_jax.compare.errors import CompareError, ReferenceWeightsError
from fcos_jax.compare.references import OUTPUT_KEYS, REFERENCES, ReferenceRun, mmdet_settings

__all__ = [
    "BOX_ATOL",
    "HEAD_RTOL",
    "INPUT_ATOL",
    "OUTPUT_KEYS",
    "REFERENCES",
    "SCORE_ATOL",
    "CompareError",
    "ReferenceRun",
    "ReferenceWeightsError",
    "compare",
    "level_differences",
    "match_detections",
    "mmdet_settings",
    "report",
]
