"""Read a PyTorch state dict (`.pth`/`.pt` via torch, `.safetensors` via safetensors) into NumPy.

PyTorch pickles are loaded with `torch.load(weights_only=True)`: a pickle that would run code or
build arbitrary objects is refused, never executed. torch is imported lazily, here only.

Besides the tensors, a file may carry a `meta` dict (mmcv/mmengine checkpoints). The mmdetection
files `convert --to mmdet` writes keep our class list there (`file_classes`): mmdetection's
`dataset_meta['classes']` (names) and, under `OUR_META_KEY`, the category ids.
"""

import re
import warnings
from pathlib import Path

import numpy as np

from fcos_jax.config.classes import ClassList
from fcos_jax.convert.errors import ConversionError

StateDict = dict[str, np.ndarray]
OUR_META_KEY = "fcos_jax"  # meta written by `convert --to mmdet`: config name, step, category ids

# Wrapper dicts around the state dict: mmcv/mmengine ('state_dict' + 'meta', ...), torchvision's
# reference scripts and many others ('model').
WRAPPER_KEYS = ("state_dict", "model")
DDP_PREFIX = "module."


def read_state_dict(path: str | Path) -> StateDict:
    """`{name: array}` of a checkpoint file, unwrapped from `state_dict`/`model` wrapper dicts.

    Floating tensors become float32 arrays (0-dim tensors stay 0-dim); integer buffers keep their
    dtype. Raises ConversionError with a one-line message naming the file on any failure.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[StateDict, dict]:
    """(`read_state_dict`'s state dict, the file's `meta` dict or {} when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        raw = _read_safetensors(path)
    else:
        raw = _read_torch(path)
    meta = raw.get("meta") if isinstance(raw, dict) else None
    return _to_state_dict(raw, path), meta if isinstance(meta, dict) else {}


def file_classes(meta: dict, path: str | Path) -> ClassList | None:
    """[(category_id, name)] in channel order from the meta of file `path`, where `convert --to
    mmdet` wrote one (mmdetection's `dataset_meta['classes']` and our category ids), else None."""
    names = (meta.get("dataset_meta") or {}).get("classes")
    ids = (meta.get(OUR_META_KEY) or {}).get("category_ids")
    if not isinstance(names, list | tuple) or not isinstance(ids, list | tuple):
        return None
    if len(names) != len(ids):
        raise ConversionError(
            f"{path}: meta holds {len(names)} class names (dataset_meta) but {len(ids)} category "
            f"ids ({OUR_META_KEY})"
        )
    return [(int(cid), str(name)) for cid, name in zip(ids, names, strict=True)]


def _read_safetensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001  (any failure: one line naming the file)
        raise ConversionError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None


def _read_torch(path: Path) -> object:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before failing
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        message = str(e)
        refused = re.search(r"(unsupported GLOBAL [^\s]+|Unsupported global: [^\s]+)", message)
        if refused:
            raise ConversionError(
                f"{path}: refused: the pickle would run code or build objects that "
                f"torch.load(weights_only=True) forbids ({refused.group(1)})"
            ) from None
        raise ConversionError(f"{path}: not a PyTorch checkpoint ({_one_line(e)})") from None


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((ln for ln in lines if "Unsupported operand" in ln), lines[0] if lines else "")
    detail = detail[:160]
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _to_state_dict(raw: object, path: Path) -> StateDict:
    for _ in range(2):  # e.g. {'state_dict': {...}} or {'model': {...}}
        if isinstance(raw, dict) and not _is_tensor_dict(raw):
            inner = next((raw[k] for k in WRAPPER_KEYS if isinstance(raw.get(k), dict)), None)
            if inner is None:
                break
            raw = inner
    if not isinstance(raw, dict) or not raw:
        raise ConversionError(f"{path}: holds no state dict (found {type(raw).__name__})")
    not_tensors = [k for k, v in raw.items() if not _is_array(v)]
    if not_tensors:
        raise ConversionError(
            f"{path}: not a state dict: {len(not_tensors)} entries are not tensors, "
            f"e.g. {not_tensors[0]!r} ({type(raw[not_tensors[0]]).__name__}); "
            f"wrapper keys understood: {', '.join(WRAPPER_KEYS)}"
        )
    keys = list(raw)
    if all(k.startswith(DDP_PREFIX) for k in keys):
        raw = {k[len(DDP_PREFIX) :]: v for k, v in raw.items()}
    return {str(k): _to_numpy(v) for k, v in raw.items()}


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(_is_array(v) for v in d.values())


def _is_array(value: object) -> bool:
    if isinstance(value, np.ndarray):
        return True
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _to_numpy(value: object) -> np.ndarray:
    if isinstance(value, np.ndarray):
        array = value
    else:
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        array = tensor.numpy()
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=False)
    return array
