"""The one check of a loaded config: known field names, and settings that cannot disagree.

Every entry point runs `check` on the config it was given (`config.io.load_config`,
`cli.config_from_flag` for train, eval, predict, compare, convert and export, and
`inference.Detector`); it raises ValueError with one line naming the fields:

  * a field the base config (`config.base.get_base_config`) does not have;
  * `legacy_plus_one` against `test.postprocess` (`modes.LEGACY_PLUS_ONE`) and against
    `targets.assigner` (torchvision's assigner has no +1), so the data, targets, losses,
    post-processing and COCO results all follow one convention;
  * `preprocess.scale_factor` against `test.postprocess` (`modes.SCALE_FACTOR`) and against
    `preprocess.resize` (the torchvision resize scales each axis by its own factor).
"""

from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections

from fcos_jax.config import base as config_base
from fcos_jax.config import modes


def _leaf_paths(config: Any, prefix: str = "") -> Iterator[str]:
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict | dict):
            yield from _leaf_paths(value, f"{path}.")
        else:
            yield path


def check_fields(config: Any, known: Sequence[str] | None = None) -> None:
    """ValueError naming the first field `config` has and the base config has not."""
    known = set(known if known is not None else _leaf_paths(config_base.get_base_config()))
    groups = {path.rsplit(".", 1)[0] for path in known if "." in path}
    for path in _leaf_paths(config):
        if path in known or path in groups:
            continue
        raise ValueError(f"config.{path}: no such field")


def check_conventions(config: Any) -> None:
    """ValueError naming both fields when the +1 or scale-factor convention disagrees."""
    mode = config.test.postprocess
    if mode not in modes.POSTPROCESS_MODES:
        raise ValueError(
            f"config.test.postprocess: expected one of {modes.POSTPROCESS_MODES}, got {mode!r}"
        )
    plus_one = bool(config.legacy_plus_one)
    if plus_one != modes.LEGACY_PLUS_ONE[mode]:
        raise ValueError(
            f"config.legacy_plus_one={plus_one} disagrees with config.test.postprocess={mode!r} "
            f"(which needs legacy_plus_one={modes.LEGACY_PLUS_ONE[mode]}, docs/modes.md §1)"
        )
    if plus_one and config.targets.assigner == "torchvision":
        raise ValueError(
            "config.legacy_plus_one=True disagrees with config.targets.assigner='torchvision' "
            "(torchvision's assigner has no +1 widths, docs/modes.md §4.8)"
        )
    factor = config.preprocess.scale_factor
    if factor not in modes.SCALE_FACTORS:
        raise ValueError(
            f"config.preprocess.scale_factor: expected one of {modes.SCALE_FACTORS}, got {factor!r}"
        )
    if factor != modes.SCALE_FACTOR[mode]:
        raise ValueError(
            f"config.preprocess.scale_factor={factor!r} disagrees with "
            f"config.test.postprocess={mode!r} (which needs {modes.SCALE_FACTOR[mode]!r})"
        )
    if factor == "single" and config.preprocess.resize == "torchvision":
        raise ValueError(
            "config.preprocess.scale_factor='single' disagrees with "
            "config.preprocess.resize='torchvision' (which scales each axis: 'per_axis')"
        )


def check(config: Any) -> None:
    """`check_fields` then `check_conventions` (module docstring)."""
    check_fields(config)
    check_conventions(config)
