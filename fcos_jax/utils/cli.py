"""Small helpers shared by the command-line tools (train, eval, predict, compare, convert,
export)."""

import re
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from fcos_jax.config import check as config_check

# `--config.a.b=v` / `--noconfig.a.b`: an override of a config file flag's field.
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([\w.]+)")


def config_from_flag(name: str = "config") -> ml_collections.ConfigDict:
    """The parsed and checked (`config_check.check`) `--config` file flag; raises
    FileNotFoundError / OSError / ValueError with one line naming the file (ml_collections
    defers load errors to the first access of the config)."""
    path = config_flags.get_config_filename(flags.FLAGS[name]).split(":")[0]
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    config = flags.FLAGS[name].value
    try:
        config.get("name")
    except Exception as error:  # noqa: BLE001  (any load failure: one line naming the file)
        detail = str(error).strip().splitlines()[-1].strip()
        raise OSError(f"{path}: cannot load config: {detail}") from None
    try:
        config_check.check(config)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return config


def _unknown_override(argv: list[str], error: BaseException) -> str:
    """One line for an override ml_collections refused because the config lacks the field
    (with its did-you-mean suggestion, if any)."""
    text = str(error)
    key = re.search(r"\w+", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    suffix = f"; did you mean {hint.group(1)}?" if hint else ""
    for arg in argv[1:]:
        match = _OVERRIDE.match(arg)
        if key and match and match.group(1).split(".")[-1] == key.group(0):
            return f"config.{match.group(1)}: no such field ({arg.split('=', 1)[0]}){suffix}"
    return f"a --config override names no field of the config: {text}"


def define_allow_other_config_name() -> flags.FlagHolder:
    """--allow_other_config_name: the tools that restore a checkpoint (eval.py, predict, export,
    compare) refuse one made for another config name; this flag lets it run under --config's
    name when the architecture is the same (another architecture is refused regardless)."""
    return flags.DEFINE_bool(
        "allow_other_config_name",
        False,
        "Use a checkpoint made for another config name when its architecture is the same.",
    )


def define_distributed_flags() -> None:
    """--coordinator_address, --num_processes, --process_id for multi-process runs."""
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process).")
    flags.DEFINE_integer("num_processes", 0, "Number of processes (0: environment / single).")
    flags.DEFINE_integer("process_id", -1, "This process's index (-1: environment).")


def start_jax(parsed_flags: flags.FlagValues, config: ml_collections.ConfigDict) -> None:
    """Sets up the process for a tool that runs `config`: hides accelerators from TensorFlow (it
    only feeds data), starts jax.distributed when several processes are asked for, turns on the
    persistent compilation cache of `test.compilation_cache_dir`, and logs the process and its
    devices."""
    import jax
    from absl import logging

    from fcos_jax.parallel import sharding
    from fcos_jax.utils import compile_cache

    quiet_library_logs()
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except ImportError:  # predict/compare environments without TensorFlow
        pass
    sharding.initialize_distributed(
        parsed_flags.coordinator_address, parsed_flags.num_processes, parsed_flags.process_id
    )
    # A process-wide JAX setting: the tool that owns the process sets it, before any compilation.
    compile_cache.enable_from_config(config)
    logging.info(
        "process %d/%d, local devices %s, global devices %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
        jax.device_count(),
    )


def log_warnings_only() -> None:
    """absl logs warnings and errors only, unless --verbosity is given: the tools' INFO lines
    (orbax logs every restore step) would bury their output and their one-line error."""
    from absl import logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def quiet_library_logs() -> None:
    """Drops orbax's and TFDS's INFO lines (dozens per checkpoint) from absl's log output."""
    import logging

    from absl import logging as absl_logging

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            noisy = ("/orbax/", "/tensorflow_datasets/")
            return record.levelno >= logging.WARNING or not any(
                part in record.pathname for part in noisy
            )

    absl_logging.get_absl_handler().addFilter(_Filter())


def run(main, errors: tuple[type[BaseException], ...] = ()) -> None:
    """absl `app.run` with one error path for every tool: a usage mistake (unknown or missing
    flag, wrong arguments) and an expected error (bad config field, missing file, unusable
    checkpoint, bad data, and the tool's own `errors`) print one line `error: ...` and exit with
    status 2. Exit status 1 stays free for a tool's own "ran, but failed" (compare's tolerance)."""
    import sys

    from absl import app

    from fcos_jax.parallel.sharding import LeaderFailedError

    expected = (
        app.UsageError,
        FileNotFoundError,
        ValueError,
        KeyError,
        AttributeError,
        OSError,
        LeaderFailedError,
        *errors,
    )

    def fail(error: BaseException) -> None:
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr, flush=True)  # one line, nothing dropped
        sys.exit(2)

    def parse_flags(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except (flags.Error, ValueError) as error:
            fail(error)
        except (AttributeError, KeyError) as error:  # an override of a field the config lacks
            fail(ValueError(_unknown_override(argv, error)))

    def guarded(argv):
        try:
            return main(argv)
        except expected as error:
            fail(error)

    app.run(guarded, flags_parser=parse_flags)
