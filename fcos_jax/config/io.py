"""Loading `configs/*.py` files outside absl (Python API, tests).

The command-line tools use `ml_collections.config_flags.DEFINE_config_file`, which accepts
`path.py[:arg]` and `--config.field=value` overrides, and `cli.config_from_flag`; both paths run
`config_check.check` on the result.
"""

import importlib.util
from pathlib import Path

import ml_collections

from fcos_jax.config import check as config_check


def load_config(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """Runs `get_config([arg])` of the config file at `path` and checks the result; raises
    FileNotFoundError / ValueError with the path on failure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"fcos_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config()")
    config = module.get_config(arg) if arg is not None else module.get_config()
    try:
        config_check.check(config)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return config
