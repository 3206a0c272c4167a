"""PyTorch checkpoints <-> our orbax layout: readers, name maps (mmdet, torchvision, backbones),
and the writers of torchvision and mmdetection 3 files (with the mmdetection 3 config).

  readers.py      PyTorch / safetensors files -> NumPy state dict (and the file's meta)
  name_maps.py    one table per format, read in both directions
  core.py         state dict -> our variables, checked completely
  expressible.py  which configs torchvision's and mmdetection's builders can express
  mmdet_config.py our config -> mmdetection 3 config (written as Python, read back safely)
  to_pytorch.py   our checkpoint -> torchvision state dict / mmdetection 3 checkpoint

torch is imported lazily by the reader and the writer only; importing this package does not
import torch. Command line: `python -m fcos_jax.convert --format {mmdet,torchvision,backbone}
--config configs/X.py --input FILE.pth|FILE.safetensors --output DIR`, and `--to
{torchvision,mmdet} --config configs/X.py --checkpoint DIR --output FILE.pth`.
"""

from fcos_jax.convert.core import (
    Converted,
    convert_file,
    convert_state_dict,
    describe,
    fit_classes,
    write_converted,
)
from fcos_jax.convert.errors import ConversionError
from fcos_jax.convert.name_maps import FORMATS
from fcos_jax.convert.readers import file_classes, read_checkpoint, read_state_dict
from fcos_jax.convert.to_pytorch import TARGETS, export_checkpoint, torch_state_dict

__all__ = [
    "FORMATS",
    "TARGETS",
    "ConversionError",
    "Converted",
    "convert_file",
    "convert_state_dict",
    "describe",
    "export_checkpoint",
    "file_classes",
    "fit_classes",
    "read_checkpoint",
    "read_state_dict",
    "torch_state_dict",
    "write_converted",
]
