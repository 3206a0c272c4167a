"""Reading JSON files with one-line errors that name the file."""

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parsed JSON of `path`. FileNotFoundError / ValueError name the file and what it was for."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
