"""Apply a name map: PyTorch state dict -> our `params`/`batch_stats` trees, checked completely.

Every target variable of the configured model (the parts the format fills) must come from a
source tensor of the right shape, and every source tensor must be used or ignored on purpose;
anything else stops the conversion with one line naming the keys (and both shapes).
"""

import dataclasses
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from fcos_jax.checkpoint import store
from fcos_jax.config.classes import ClassList, class_list, resolve_num_classes
from fcos_jax.convert import name_maps
from fcos_jax.convert.errors import ConversionError
from fcos_jax.convert.readers import StateDict, file_classes, read_checkpoint

COLLECTIONS = ("params", "batch_stats")
COUNTERS_META_KEY = "num_batches_tracked"  # in our checkpoint's meta: {BN module path: count}


@dataclasses.dataclass(frozen=True)
class Converted:
    """Converted variables (nested dicts of float32 NumPy arrays) and what was done."""

    params: dict[str, Any]
    batch_stats: dict[str, Any]
    parts: tuple[str, ...]  # model parts filled from the source (backbone, neck, bbox_head)
    untouched: tuple[str, ...]  # model parts left at their initialisation
    ignored: tuple[str, ...]  # source keys dropped on purpose
    num_tensors: int  # source tensors used
    # Our BN module path ('backbone/layer1_0/bn1') -> the source's `num_batches_tracked`: kept in
    # the checkpoint's meta, so that writing a PyTorch file puts the same counts back.
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    classes: ClassList | None = None  # the class list the file carries (files we wrote), if any


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
    expected = store.abstract_variables(config.model)
    model_parts = tuple(expected["params"])

    flat_out: dict[str, dict[tuple[str, ...], np.ndarray]] = {c: {} for c in COLLECTIONS}
    used: set[str] = set()
    ignorable = set(name_map.ignored)
    counters: dict[str, int] = {}
    counter_keys: set[str] = set()
    missing, wrong_shape = [], []
    for collection in COLLECTIONS:
        for path, abstract in traverse_util.flatten_dict(dict(expected[collection])).items():
            if path[0] not in name_map.parts:
                continue
            module, leaf = "/".join(path[:-1]), path[-1]
            kind, candidates = name_map.lookup(module)
            source_leaf = name_maps.source_leaf(kind, leaf, f"{collection}/{module}/{leaf}")
            ignorable.update(f"{c}.{x}" for c in candidates for x in name_maps.IGNORED_LEAVES[kind])
            keys = [f"{c}.{source_leaf}" for c in candidates]
            key = next((k for k in keys if k in state_dict), None)
            if key is None:
                missing.append(" or ".join(keys))
                continue
            used.add(key)
            counter = f"{key.rsplit('.', 1)[0]}.{name_maps.COUNTER}"
            if collection == "batch_stats" and counter in state_dict:
                counters[module] = int(state_dict[counter])
                counter_keys.add(counter)
            want = name_maps.torch_shape(kind, leaf, abstract.shape)
            got = tuple(state_dict[key].shape)
            if got != want:
                wrong_shape.append(f"{key} has shape {got}, {'/'.join(path)} needs {want}")
                continue
            flat_out[collection][path] = name_maps.to_ours(kind, leaf, state_dict[key])

    unexpected = [k for k in state_dict if k not in used and k not in ignorable]
    problems = store.join_problems(
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
        ignored=tuple(sorted(k for k in state_dict if k in ignorable and k not in counter_keys)),
        num_tensors=len(used),
        counters=counters,
    )


def describe(converted: Converted) -> list[str]:
    """Report lines: tensors used, counters kept, tensors ignored on purpose, parts left at
    init."""
    lines = [f"{converted.num_tensors} tensors fill: {', '.join(converted.parts)}"]
    if converted.counters:
        lines.append(
            f"{len(converted.counters)} BatchNorm num_batches_tracked counters kept in the meta "
            "(written back by --to)"
        )
    if converted.ignored:
        lines.append(f"ignored on purpose: {store.listing(list(converted.ignored), 3)}")
    if converted.untouched:
        lines.append(
            f"left at their initialisation: {', '.join(converted.untouched)} "
            "(not in this file; start training from it with config.init_from)"
        )
    return lines


def fit_classes(
    config: ml_collections.ConfigDict, classes: ClassList | None, source: str
) -> ml_collections.ConfigDict:
    """`config` with the head sized for `classes` (the class list a file carries, or None).

    A head of `model.head.num_classes = 0` takes its size from the file's class list; without
    one it cannot be sized (ConversionError naming `source`). A fixed head must match it."""
    if classes is not None:
        try:
            return resolve_num_classes(config, classes, source)
        except ValueError as error:
            raise ConversionError(str(error)) from None
    if int(config.model.head.num_classes) == 0:
        raise ConversionError(
            f"{source}: carries no class list, and config {config.name!r} takes its class count "
            "from the data (model.head.num_classes = 0); give the config the file's class count"
        )
    return config


def convert_file(path: str | Path, fmt: str, config: ml_collections.ConfigDict) -> Converted:
    """Reads a `.pth`/`.pt`/`.safetensors` file and converts it (see `convert_state_dict`); the
    class list of a file we wrote comes along (`Converted.classes`)."""
    state_dict, meta = read_checkpoint(path)
    classes = file_classes(meta, path)
    config = fit_classes(config, classes, str(path))
    converted = convert_state_dict(state_dict, fmt, config, source=str(path))
    return dataclasses.replace(converted, classes=classes)


def write_converted(
    converted: Converted, output_dir: str | Path, config: ml_collections.ConfigDict, source: str
) -> Path:
    """Saves `converted` as step 0 of `<output_dir>/checkpoints` with its meta (the file's class
    list if it carried one, else the list the config names; its BN counters); returns the root."""
    classes = converted.classes
    if classes is None:
        if config.data.classes == "dataset":
            raise ConversionError(
                f"{source}: carries no class list, and config {config.name!r} takes its class "
                "list from the data (data.classes = 'dataset'); give the config a named list "
                "(data.classes = 'coco', ...)"
            )
        classes = class_list(config.data.classes)
    try:
        meta = store.make_meta(config, source, converted.parts, classes=classes)
        if converted.counters:
            meta[COUNTERS_META_KEY] = dict(converted.counters)
        return store.save_converted(output_dir, converted.params, converted.batch_stats, meta)
    except store.CheckpointError as e:
        raise ConversionError(str(e)) from None
