"""Helpers of the fault tests: damage a checkpoint step the ways disks and people do."""

import shutil
from pathlib import Path

import numpy as np


def largest_array_file(step_dir: Path, item: str = "params") -> Path:
    """The largest data file an item's process wrote (`ocdbt.process_<i>/d/`): most of its
    arrays' bytes are there (arrays under 1 KiB compressed live in the index nodes)."""
    files = [p for p in (step_dir / item).glob("ocdbt.process_*/d/*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def truncate(path: Path) -> None:
    """Keeps the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def overwrite_middle(path: Path, size: int = 4096, seed: int = 0) -> None:
    """Replaces `size` bytes in the middle of the file with random bytes (same length)."""
    data = path.read_bytes()
    start = max(len(data) // 2 - size // 2, 0)
    garbage = np.random.default_rng(seed).bytes(min(size, len(data) - start))
    path.write_bytes(data[:start] + garbage + data[start + len(garbage) :])


def write_garbage(path: Path) -> None:
    """Replaces a JSON file's content with bytes that are not JSON."""
    path.write_bytes(b'{"format_version": 2, \x00\x17 garbage')


def copy_workdir(source: Path, target: Path) -> Path:
    """A copy of a workdir's checkpoints (the damage tests change their copy only)."""
    shutil.copytree(source / "checkpoints", target / "checkpoints")
    return target
