"""Configuration: the settings every config file starts from, how a file is loaded and checked.

  base.py     `get_base_config()`: every field, in groups named after the modules that read them
  io.py       `load_config(path)`: a `configs/*.py` file outside absl, checked
  check.py    the one check of a loaded config: known fields, conventions that cannot disagree
  modes.py    each post-processing mode's +1 and scale-factor convention
  classes.py  class lists: channel -> (dataset category id, name)
  groups.py   a config group as the keyword arguments of the module it configures

No module here imports JAX: a config is loaded and checked before anything is compiled.
"""

from fcos_jax.config.io import load_config

__all__ = ["load_config"]
