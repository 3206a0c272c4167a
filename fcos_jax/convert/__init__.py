"""PyTorch checkpoints -> our orbax layout: readers and name maps (mmdet, torchvision, backbones).

torch is imported lazily by the reader only; importing this package does not import torch.
Command line: `python -m fcos_jax.convert --format {mmdet,torchvision,backbone}
--config configs/X.py --input FILE.pth|FILE.safetensors --output DIR`.
"""

from fcos_jax.convert.core import (
    Converted,
    convert_file,
    convert_state_dict,
    describe,
    write_converted,
)
from fcos_jax.convert.errors import ConversionError
from fcos_jax.convert.name_maps import FORMATS
from fcos_jax.convert.readers import read_state_dict

__all__ = [
    "FORMATS",
    "ConversionError",
    "Converted",
    "convert_file",
    "convert_state_dict",
    "describe",
    "read_state_dict",
    "write_converted",
]
