"""Run the package's command lines in fresh interpreters (test helpers)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_module(module: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", **(env or {})),
        capture_output=True,
        text=True,
        timeout=900,
    )


def cli_env(**extra) -> dict:
    """The environment of a command under test: quiet TensorFlow, unbuffered output, one host
    device unless `extra` sets XLA_FLAGS."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def run_command(command: list, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    """`command` (e.g. [python, 'train.py', ...]) from the repository root with `cli_env(**env)`,
    output captured as text."""
    return subprocess.run(
        [str(c) for c in command],
        cwd=REPO,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def config_overrides(overrides: dict) -> list[str]:
    """{'train.num_steps': 4} -> ['--config.train.num_steps=4']."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]
