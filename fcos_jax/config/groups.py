"""A config group as the keyword arguments of what it configures.

The Flax modules name their fields as their config group does (`ResNet`'s are
`model.backbone`'s, `FPN`'s `model.fpn`'s, `FCOSHead`'s `model.head`'s), so a module is built
from its group with no hand-written list of arguments, as big_vision builds `Model(**config.model)`:
a field added to the group and the module reaches the module without another edit.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any


def _hashable(value: Any) -> Any:
    """Lists (a config read back from JSON) and tuples as tuples: Flax module fields must hash."""
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value


def kwargs_for(cls: type, *groups: Mapping[str, Any], **given: Any) -> dict[str, Any]:
    """Keyword arguments of the dataclass `cls` (a Flax module, a settings class): each field of
    `cls` that one of `groups` holds, sequences as tuples, then `given`, which takes precedence.

    A group's fields that `cls` does not declare are not its to read (`model.backbone`'s
    `norm_trainable` is the optimizer's). A field that two groups hold is ambiguous and raises
    ValueError unless `given` sets it.
    """
    names = {field.name for field in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for group in groups:
        for name, value in group.items():
            if name not in names or name in given:
                continue
            if name in kwargs:
                raise ValueError(f"{cls.__name__}.{name}: set by two config groups; pass it")
            kwargs[name] = _hashable(value)
    return kwargs | given
