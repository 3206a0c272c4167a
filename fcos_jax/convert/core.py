"""Apply a name map: PyTorch state dict -> our `params`/`batch_stats` trees, checked completely.

Every target variable of the configured model (the parts the format fills) must come from a
source tensor of the right shape, and every source tensor must be used or ignored on purpose;
anything else stops the conversion with one line naming the keys (and both shapes).
"""

import dataclasses
import re
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from fcos_jax import checkpoint
from fcos_jax.convert import name_maps
from fcos_jax.convert.errors import ConversionError
from fcos_jax.convert.readers import StateDict, read_state_dict

COLLECTIONS = ("params", "batch_stats")


@dataclasses.dataclass(frozen=True)
class Converted:
    """Converted variables (nested dicts of float32 NumPy arrays) and what was done."""

    params: dict[str, Any]
    batch_stats: dict[str, Any]
    parts: tuple[str, ...]  # model parts filled from the source (backbone, neck, bbox_head)
    untouched: tuple[str, ...]  # model parts left at their initialisation
    ignored: tuple[str, ...]  # source keys dropped on purpose
    num_tensors: int  # source tensors used


def _find_rule(name_map: name_maps.NameMap, module: str) -> tuple[name_maps.Rule, re.Match]:
    for rule in name_map.rules:
        match = re.fullmatch(rule.target, module)
        if match:
            return rule, match
    raise ConversionError(f"no {name_map.description} name rule for our module {module}")


def _source_shape(kind: str, leaf: str, target_shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == name_maps.CONV and leaf == "kernel":
        kh, kw, cin, cout = target_shape
        return (cout, cin, kh, kw)
    return tuple(target_shape)


def _to_target(kind: str, leaf: str, array: np.ndarray) -> np.ndarray:
    if kind == name_maps.CONV and leaf == "kernel":
        array = np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO (grouped: I is I/groups)
    return np.array(array, dtype=np.float32, order="C")  # (ascontiguousarray makes 0-dim 1-dim)


def convert_state_dict(
    state_dict: StateDict,
    fmt: str,
    config: ml_collections.ConfigDict,
    source: str = "state dict",
) -> Converted:
    """Maps `state_dict` ({key: array}, PyTorch layout) onto the model of `config`.

    fmt: 'mmdet' (v1/v2/v3 FCOS), 'torchvision' (fcos_resnet50_fpn) or 'backbone' (ImageNet
    ResNet/ResNeXt; fills only `backbone`). Target shapes come from `config.model` via
    `jax.eval_shape`. Raises ConversionError (one line, naming `source` and the keys) on missing,
    unexpected or wrongly shaped tensors.
    """
    if fmt not in name_maps.FORMATS:
        raise ConversionError(f"--format {fmt!r}: not one of {', '.join(name_maps.FORMATS)}")
    name_map = name_maps.FORMATS[fmt]
    expected = checkpoint.abstract_variables(config.model)
    model_parts = tuple(expected["params"])

    flat_out: dict[str, dict[tuple[str, ...], np.ndarray]] = {c: {} for c in COLLECTIONS}
    used: set[str] = set()
    ignorable = set(name_map.ignored)
    missing, wrong_shape = [], []
    for collection in COLLECTIONS:
        for path, abstract in traverse_util.flatten_dict(dict(expected[collection])).items():
            if path[0] not in name_map.parts:
                continue
            module, leaf = "/".join(path[:-1]), path[-1]
            rule, match = _find_rule(name_map, module)
            source_leaf = name_maps.LEAVES[rule.kind].get(leaf)
            if source_leaf is None:
                raise ConversionError(f"no {fmt} name for our {collection}/{module}/{leaf}")
            candidates = rule.source_candidates(match)
            ignored_leaves = name_maps.IGNORED_LEAVES[rule.kind]
            ignorable.update(f"{c}.{x}" for c in candidates for x in ignored_leaves)
            keys = [f"{c}.{source_leaf}" for c in candidates]
            key = next((k for k in keys if k in state_dict), None)
            if key is None:
                missing.append(" or ".join(keys))
                continue
            used.add(key)
            want = _source_shape(rule.kind, leaf, abstract.shape)
            got = tuple(state_dict[key].shape)
            if got != want:
                wrong_shape.append(f"{key} has shape {got}, {'/'.join(path)} needs {want}")
                continue
            flat_out[collection][path] = _to_target(rule.kind, leaf, state_dict[key])

    unexpected = [k for k in state_dict if k not in used and k not in ignorable]
    problems = checkpoint.join_problems(
        [
            (f"{len(missing)} tensors missing:", missing, 4),
            (f"{len(unexpected)} unexpected tensors:", unexpected, 4),
            (f"{len(wrong_shape)} wrongly shaped:", wrong_shape, 3),
        ]
    )
    if problems:
        hint = ""
        if missing or unexpected:
            guess = name_maps.guess_format(list(state_dict))
            if guess and guess != fmt:
                hint = f" (the keys look like --format {guess})"
        raise ConversionError(
            f"{source}: does not fit --format {fmt} for config {config.name!r}: " + problems + hint
        )

    return Converted(
        params=traverse_util.unflatten_dict(flat_out["params"]),
        batch_stats=traverse_util.unflatten_dict(flat_out["batch_stats"]),
        parts=tuple(p for p in model_parts if p in name_map.parts),
        untouched=tuple(p for p in model_parts if p not in name_map.parts),
        ignored=tuple(sorted(k for k in state_dict if k in ignorable)),
        num_tensors=len(used),
    )


def describe(converted: Converted) -> list[str]:
    """Report lines: tensors used, tensors ignored on purpose, model parts left at init."""
    lines = [f"{converted.num_tensors} tensors fill: {', '.join(converted.parts)}"]
    if converted.ignored:
        lines.append(f"ignored on purpose: {checkpoint.listing(list(converted.ignored), 3)}")
    if converted.untouched:
        lines.append(
            f"left at their initialisation: {', '.join(converted.untouched)} "
            "(not in this file; start training from it with config.init_from)"
        )
    return lines


def convert_file(path: str | Path, fmt: str, config: ml_collections.ConfigDict) -> Converted:
    """Reads a `.pth`/`.pt`/`.safetensors` file and converts it (see `convert_state_dict`)."""
    return convert_state_dict(read_state_dict(path), fmt, config, source=str(path))


def write_converted(
    converted: Converted, output_dir: str | Path, config: ml_collections.ConfigDict, source: str
) -> Path:
    """Saves `converted` as step 0 of `<output_dir>/checkpoints` with its meta; returns the root."""
    try:
        meta = checkpoint.make_meta(config, source, parts=converted.parts)
        return checkpoint.save_converted(output_dir, converted.params, converted.batch_stats, meta)
    except checkpoint.CheckpointError as e:
        raise ConversionError(str(e)) from None
