"""Shared fixtures. torch is imported before anything can import TensorFlow (stack_notes.md)."""

import os
import sys
from pathlib import Path

import torch  # noqa: F401  (must precede tensorflow; see stack_notes.md)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
