"""JAX's persistent compilation cache: compiled programs kept on disk across runs.

`test.compilation_cache_dir` (or JAX's own `JAX_COMPILATION_CACHE_DIR` environment variable)
turns it on for `train.py` and `eval.py` (at process start-up, `cli.start_jax`) and for
prediction (`Detector`).
"""

from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache


def enable(directory: str | Path) -> None:
    """Turns on JAX's persistent compilation cache in `directory` (created if needed)."""
    directory = Path(directory).expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir == str(directory):
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Cache every program (the default skips compilations under 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # JAX fixes its cache at the first compilation; start over so the new directory is used.
    compilation_cache.reset_cache()


def enable_from_config(config, override: str | Path | None = None) -> None:
    """`enable(override or config.test.compilation_cache_dir)`; nothing when both are empty."""
    directory = override or config.test.get("compilation_cache_dir", "")
    if directory:
        enable(directory)
