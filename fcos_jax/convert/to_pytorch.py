"""Our checkpoint -> a PyTorch file: a torchvision `fcos_resnet50_fpn` state dict, or an
mmdetection 3 checkpoint and the mmdetection 3 config that builds its model.

The name maps of the import direction serve backwards (`name_maps.NameMap.lookup`; the first
candidate is the current spelling, so a model converted from an mmdet v1 file goes out with
mmdetection 3's `conv_cls` names). Every BatchNorm gets its `num_batches_tracked` (torch's
`BatchNorm2d` state dicts have one, and `load_state_dict(strict=True)` wants it): the count an
imported file had (kept in our meta), else the training steps whose batches updated its running
averages (`batch_stats_bn`), else 0 (statistics never updated). Files are written with
`torch.save` of plain tensors (and, for mmdetection, a meta of plain lists and strings), so
`torch.load(weights_only=True)` reads them. torch is imported when a file is written.
"""

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from fcos_jax.checkpoint import store
from fcos_jax.config.classes import ClassList, from_meta
from fcos_jax.convert import expressible, name_maps
from fcos_jax.convert.core import COLLECTIONS, COUNTERS_META_KEY, fit_classes
from fcos_jax.convert.errors import ConversionError
from fcos_jax.convert.mmdet_config import mmdet_config, render
from fcos_jax.convert.readers import OUR_META_KEY, StateDict

TARGETS = ("torchvision", "mmdet")
OUTPUT_SUFFIXES = (".pth", ".pt")
_BUILDERS = {
    "torchvision": ("torchvision's fcos_resnet50_fpn", expressible.torchvision_problems),
    "mmdet": ("mmdetection 3's FCOS", expressible.mmdet_problems),
}


def torch_state_dict(
    variables: Mapping[str, Any],
    fmt: str,
    counters: Mapping[str, int],
    default_count: int,
) -> StateDict:
    """`{key: array}` in the PyTorch layout of `fmt` ('torchvision' or 'mmdet') of our
    `variables` ({'params', 'batch_stats'}): float32 tensors, conv kernels OIHW, and int64 0-dim
    `num_batches_tracked` for every BatchNorm (`counters[our module path]`, else
    `default_count`). Keys in natural order (layer2 before layer10)."""
    name_map = name_maps.FORMATS[fmt]
    out: StateDict = {}
    for collection in COLLECTIONS:
        flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
        for path, value in flat.items():
            module, leaf = "/".join(path[:-1]), path[-1]
            kind, candidates = name_map.lookup(module)
            where = f"{collection}/{module}/{leaf}"
            key = f"{candidates[0]}.{name_maps.source_leaf(kind, leaf, where)}"
            out[key] = name_maps.to_torch(kind, leaf, np.asarray(value))
            if collection == "batch_stats" and leaf == "mean":
                count = counters.get(module, default_count)
                out[f"{candidates[0]}.{name_maps.COUNTER}"] = np.asarray(count, np.int64)
    natural = lambda key: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]  # noqa: E731
    return {key: out[key] for key in sorted(out, key=natural)}


def check_output(output: str | Path, fmt: str) -> list[Path]:
    """The files `--to fmt --output FILE` writes (FILE, and for mmdet FILE's `.py` config);
    ConversionError when FILE's suffix is not .pth/.pt or a file exists already."""
    output = Path(output)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise ConversionError(f"--output {output}: name a {' or '.join(OUTPUT_SUFFIXES)} file")
    files = [output] + ([output.with_suffix(".py")] if fmt == "mmdet" else [])
    for path in files:
        if path.exists():
            raise ConversionError(f"{path} already exists; choose another --output")
    if not output.parent.is_dir():
        raise ConversionError(f"--output {output}: no directory {output.parent}")
    return files


def check_expressible(config: ml_collections.ConfigDict, fmt: str) -> None:
    """ConversionError (one line) listing what the PyTorch builder of `fmt` cannot express."""
    builder, problems_of = _BUILDERS[fmt]
    problems = problems_of(config)
    if problems:
        raise ConversionError(
            f"--to {fmt}: {builder} cannot express config {config.name!r}: " + "; ".join(problems)
        )


def export_checkpoint(
    checkpoint_dir: str | Path,
    config: ml_collections.ConfigDict,
    fmt: str,
    output: str | Path,
) -> list[str]:
    """Writes our checkpoint (a converted directory or a training workdir: its latest step) as
    the PyTorch file `output` of `fmt` ('torchvision' or 'mmdet'; mmdet also writes the config
    `output` with suffix .py). Returns report lines. Raises ConversionError / CheckpointError
    (one line) for an existing output, a config the builder cannot express, or a checkpoint of
    another config."""
    if fmt not in TARGETS:
        raise ConversionError(f"--to {fmt!r}: not one of {', '.join(TARGETS)}")
    files = check_output(output, fmt)
    check_expressible(config, fmt)
    variables, meta, step = _restore(checkpoint_dir, config)
    classes = from_meta(meta, str(checkpoint_dir))
    config = fit_classes(config, classes, str(checkpoint_dir))
    default_count = step if config.model.backbone.norm == "batch_stats_bn" else 0
    state_dict = torch_state_dict(variables, fmt, meta.get(COUNTERS_META_KEY, {}), default_count)
    if fmt == "torchvision":
        _save(state_dict, files[0])
        return [
            f"wrote {files[0]}: {len(state_dict)} tensors of step {step}, for",
            f"  {torchvision_builder_call(config, len(classes))}",
            "  .load_state_dict(torch.load(path, weights_only=True), strict=True)",
        ]
    text = render(
        mmdet_config(config, classes), _config_header(config, files, checkpoint_dir, step)
    )
    mmdet_meta = _mmdet_meta(config, classes, checkpoint_dir, step, files[1].name)
    _save({"meta": mmdet_meta, "state_dict": state_dict}, files[0])
    files[1].write_text(text)
    return [
        f"wrote {files[0]}: mmdetection 3 checkpoint, {len(state_dict)} tensors of step {step}, "
        f"{len(classes)} classes",
        f"wrote {files[1]}: the mmdetection 3 config of its model",
        f"  mmdet.apis.init_detector('{files[1]}', '{files[0]}')",
    ]


def torchvision_builder_call(config: ml_collections.ConfigDict, num_classes: int) -> str:
    """The `fcos_resnet50_fpn(...)` call that builds the model `config` describes (its size,
    normalisation and test thresholds are builder arguments)."""
    p, t = config.preprocess, config.test
    arguments = {
        "weights": None,
        "weights_backbone": None,
        "num_classes": num_classes,
        "min_size": min(p.scale),
        "max_size": max(p.scale),
        "image_mean": list(p.mean),
        "image_std": list(p.std),
        "score_thresh": t.score_thr,
        "nms_thresh": t.nms_iou,
        "detections_per_img": t.max_per_img,
        "topk_candidates": t.nms_pre,
    }
    joined = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
    return f"torchvision.models.detection.fcos_resnet50_fpn({joined})"


def _restore(
    checkpoint_dir: str | Path, config: ml_collections.ConfigDict
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(variables as NumPy, meta, step) of the newest intact step (or the step directory given);
    a checkpoint made for another config is refused (its shapes, or its config name: the file
    written is `config`'s model, so no other name is taken)."""
    step, variables, meta = store.restore_inference_step(
        checkpoint_dir,
        config,
        allow_other_config_name=True,  # refused below, with our remedy
    )
    made_for = meta.get("config_name")
    if made_for != config.name:
        raise ConversionError(
            f"{checkpoint_dir}: a checkpoint of config {made_for!r}, not {config.name!r} "
            "(give the --config it was trained or converted with)"
        )
    return {k: _to_numpy(v) for k, v in variables.items()}, meta, int(step)


def _to_numpy(tree: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _mmdet_meta(
    config: ml_collections.ConfigDict,
    classes: ClassList,
    checkpoint_dir: str | Path,
    step: int,
    config_file: str,
) -> dict[str, Any]:
    """mmengine's `meta` as mmdetection reads it (`dataset_meta['classes']`) and ours: the
    config, step and category ids that make the way back exact (`readers.file_classes`)."""
    return {
        "dataset_meta": {"classes": tuple(name for _, name in classes)},
        OUR_META_KEY: {
            "config_name": config.name,
            "source": str(Path(checkpoint_dir).absolute()),
            "step": step,
            "category_ids": [int(cid) for cid, _ in classes],
            "mmdet_config": config_file,
        },
    }


def _config_header(
    config: ml_collections.ConfigDict, files: list[Path], checkpoint_dir: str | Path, step: int
) -> str:
    lines = [
        f"mmdetection 3 config of fcos_jax config {config.name!r} (checkpoint {checkpoint_dir}, "
        f"step {step}); weights: {files[0].name}",
        "Written by `python -m fcos_jax.convert --to mmdet`. Inference:",
        f"  model = mmdet.apis.init_detector('{files[1].name}', '{files[0].name}')",
        "To evaluate with tools/test.py, give test_dataloader.dataset its data_root, ann_file",
        "and data_prefix, and add a test_evaluator.",
    ]
    if config.test.postprocess == "mmdet_v1":
        lines.append(
            "The model was made for mmdetection v1's test path; mmdetection 3 runs its own (v3)"
        )
        lines.append("post-processing with the same thresholds (fcos_jax docs/porting.md).")
    return "\n".join(lines)


def _save(obj: dict, path: Path) -> None:
    """torch.save of `obj` (NumPy arrays as tensors) to `path`, via a temporary file so that no
    partial file is left behind."""
    import torch

    def tensors(value):
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.array(value, order="C"))  # 0-dim stays 0-dim
        if isinstance(value, dict):
            return {k: tensors(v) for k, v in value.items()}
        return value

    partial = path.with_name(f".{path.name}.partial")
    torch.save(tensors(obj), partial)
    os.replace(partial, path)
