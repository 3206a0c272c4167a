"""Checksums of a checkpoint step, and how a step that does not match them is described.

A step's `checksums` item (JSON) holds the SHA-256 of every array and of each JSON item, taken
from the values handed to the save (`checksums`): a restore compared with it (`mismatches`)
checks orbax's write, the disk and the read together. Arrays are named by their place in the
item's tree, `params/backbone/conv1/kernel`, `opt_state/0/trace/...`; JSON items by their item
name. An array hashes as its dtype, shape and C-order bytes.
"""

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

PyTree = Any
ALGORITHM = "sha256"
# How TensorStore names what it failed to read (the error orbax chains under its own):
#   OUT_OF_RANGE: Error reading "backbone.conv1.kernel/0.0.0.0" in OCDBT database at local
#   file "/w/checkpoints/5/params/": ...
_READ_ERROR = re.compile(r'Error reading "(?P<array>[^"/]+)/[^"]*".*?file "(?P<item>[^"]+?)/?"')


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey (named tuples), SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_leaves(item: str, tree: PyTree) -> Iterator[tuple[str, Any]]:
    """('item/a/b', leaf) for every leaf of `tree` (None and empty subtrees have none)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield "/".join([item, *(_key_name(k) for k in path)]), leaf


def _host_array(leaf: Any) -> np.ndarray:
    """A NumPy view of `leaf`; a replicated array of several processes from its local copy."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
            raise ValueError("checkpoint checksums: only replicated arrays can be hashed here")
        leaf = leaf.addressable_data(0)
    return np.asarray(leaf)


def array_digest(leaf: Any) -> str:
    """SHA-256 hex digest of an array's dtype, shape and C-order bytes."""
    array = _host_array(leaf)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).view(np.uint8))
    return digest.hexdigest()


def json_digest(value: Any) -> str:
    """SHA-256 hex digest of `value` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def checksums(arrays: dict[str, PyTree], json_items: dict[str, Any]) -> dict[str, Any]:
    """The `checksums` item of a save of `arrays` ({item: tree}) and `json_items` ({item:
    JSON-serialisable value})."""
    return {
        "algorithm": ALGORITHM,
        "arrays": {
            name: array_digest(leaf)
            for item, tree in arrays.items()
            for name, leaf in named_leaves(item, tree)
        },
        "json": {item: json_digest(value) for item, value in json_items.items()},
    }


def mismatches(
    recorded: dict[str, Any], arrays: dict[str, PyTree], json_items: dict[str, Any]
) -> list[str]:
    """What of the restored `arrays` and `json_items` differs from the `recorded` checksums:
    ['array params/a/b differs from its checksum', 'meta differs ...', 'array ... has no
    checksum', ...]; [] when everything matches. Recorded arrays of items not restored are not
    looked at."""
    if recorded.get("algorithm") != ALGORITHM:
        return [f"checksums use algorithm {recorded.get('algorithm')!r}, not {ALGORITHM!r}"]
    wanted = recorded.get("arrays", {})
    problems, seen = [], set()
    for item, tree in arrays.items():
        for name, leaf in named_leaves(item, tree):
            seen.add(name)
            if name not in wanted:
                problems.append(f"array {name} has no checksum")
            elif array_digest(leaf) != wanted[name]:
                problems.append(f"array {name} differs from its checksum")
    missing = [n for n in wanted if n.split("/", 1)[0] in arrays and n not in seen]
    problems += [f"array {name} is missing" for name in missing]
    for item, value in json_items.items():
        if json_digest(value) != recorded.get("json", {}).get(item):
            problems.append(f"{item} differs from its checksum")
    return problems


def read_error(error: BaseException) -> tuple[str | None, str]:
    """(the array 'item/a/b' a failed TensorStore read names, or None; the error's own first
    line). Orbax raises a generic exception and chains TensorStore's error under it."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    first_line = lambda e: (str(e).strip() or type(e).__name__).splitlines()[0][:300]  # noqa: E731
    for link in reversed(chain):  # the innermost error is the most specific
        match = _READ_ERROR.search(str(link))
        if match:
            item = match.group("item").rstrip("/").rsplit("/", 1)[-1]
            array = match.group("array").replace(".", "/")
            return f"{item}/{array}", first_line(link)
    return None, first_line(chain[-1]) if chain else ""
