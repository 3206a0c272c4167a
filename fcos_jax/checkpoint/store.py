"""Orbax checkpoints: `<dir>/checkpoints/<step>/{params, batch_stats, opt_state, data_state, meta,
checksums}`.

One layout for trained and converted weights (docs/architecture.md#checkpoints):
  params       Flax `params` tree (float32).
  batch_stats  Flax `batch_stats` tree (frozen BN running mean/var).
  opt_state    optax state (training checkpoints only).
  data_state   JSON dict of the data pipeline's position (training checkpoints only).
  meta         JSON: format version, config name, source, parts held, class list
               `[[category_id, name], ...]` in class-channel order.
  checksums    JSON: SHA-256 of every array and JSON item as handed to the save
               (`checksums`); written by orbax with the step, so a finished step
               always has it. Format version 1 steps (before checksums) are read unverified,
               with a warning.
The converter writes step 0 without `opt_state`/`data_state`. Inference restores only `params`,
`batch_stats` and `meta` from a converted directory or a training workdir (its newest intact
step), or from one step directory `<dir>/checkpoints/<step>` (that step or an error).

Every restore is verified: a step whose files cannot be read, whose JSON is not valid or whose
values differ from its checksums raises CheckpointDamagedError in one line naming the step and
the array or file. Given a directory, the newest intact step is used and each newer damaged step
is named in a warning; given a step, a damaged one is an error.
"""

import functools
import hashlib
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from fcos_jax.config.classes import ClassList, from_meta, resolve_num_classes
from fcos_jax.models import build_model
from fcos_jax.parallel import sharding as mesh_lib
from fcos_jax.utils import jsonio

# 2: every step holds a `checksums` item; 1: written before checksums (read unverified).
FORMAT_VERSION = 2
CHECKPOINT_SUBDIR = "checkpoints"
MODEL_PARTS = ("backbone", "neck", "bbox_head")
ARRAY_ITEMS = ("params", "batch_stats", "opt_state")
JSON_ITEMS = ("data_state", "meta", "checksums")
JSON_FILE = "metadata"  # the file orbax's JSON handler writes in an item's directory

PyTree = Any
T = TypeVar("T")
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or does not fit the configured model."""


class CheckpointDamagedError(CheckpointError):
    """A step that cannot be read, or whose arrays or JSON differ from its checksums."""


# Checksums. A step's `checksums` item holds the SHA-256 of every array and of each JSON item,
# taken from the values handed to the save: a restore compared with it checks orbax's write,
# the disk and the read together. Arrays are named by their place in the item's tree
# (`params/backbone/conv1/kernel`, `opt_state/0/trace/...`), JSON items by the item's name; an
# array hashes as its dtype, shape and C-order bytes.
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


@functools.lru_cache(maxsize=8)
def _abstract_variables_cached(model_config_json: str) -> dict[str, PyTree]:
    model_config = ml_collections.ConfigDict(json.loads(model_config_json))
    model = build_model(model_config)
    image = jnp.zeros((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), image))
    return {col: dict(shapes.get(col, {})) for col in ("params", "batch_stats")}


def abstract_variables(model_config: ml_collections.ConfigDict) -> dict[str, PyTree]:
    """`{'params': tree, 'batch_stats': tree}` of `jax.ShapeDtypeStruct` for `config.model`.

    Computed with `jax.eval_shape` (no arrays are allocated) and cached per model config.
    """
    return _abstract_variables_cached(model_config.to_json(sort_keys=True))


def make_meta(
    config: ml_collections.ConfigDict,
    source: str,
    parts: tuple[str, ...] = MODEL_PARTS,
    *,
    classes: ClassList,
) -> dict[str, Any]:
    """The `meta` item: format version, config name, source description, parts, class list.

    classes: channel -> (category id, name) of the model: the training data's, or the class
    list a converted file carries or its config names (`save` refuses a head with another
    number of class channels).
    """
    return {
        "format_version": FORMAT_VERSION,
        "config_name": config.name,
        "source": source,
        "parts": list(parts),
        "classes": [[int(cid), name] for cid, name in classes],
    }


def check_head_fits(params: PyTree, meta: dict[str, Any], where: str | Path) -> None:
    """CheckpointError naming `where` when the head's class channels (`bbox_head/conv_cls`)
    differ in number from the meta's class list; a save without a head is not checked."""
    bias = params.get("bbox_head", {}).get("conv_cls", {}).get("bias")
    if bias is None:
        return
    channels, classes = int(bias.shape[-1]), len(meta["classes"])
    if channels != classes:
        raise CheckpointError(
            f"{where}: the meta's class list has {classes} classes, but the head "
            f"(bbox_head/conv_cls) has {channels} class channels"
        )


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
    return handlers


def checkpoint_manager(
    directory: str | Path, max_to_keep: int | None = None, create: bool = True
) -> ocp.CheckpointManager:
    """An orbax `CheckpointManager` on `<directory>/checkpoints` with the five items registered."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    root = Path(directory).absolute() / CHECKPOINT_SUBDIR
    return ocp.CheckpointManager(root, options=options, item_handlers=_handlers())


def save(
    manager: ocp.CheckpointManager,
    step: int,
    params: PyTree,
    batch_stats: PyTree,
    meta: dict[str, Any],
    opt_state: PyTree | None = None,
    data_state: dict[str, Any] | None = None,
) -> None:
    """Starts an (asynchronous) save of `step`; call `manager.wait_until_finished()` before exit.

    `opt_state` and `data_state` are omitted for weights-only checkpoints (converted weights).
    `data_state` must be JSON-serialisable (plain ints, floats, strings, lists, dicts). The
    arrays are hashed for the step's `checksums` before this returns (replicated arrays only).
    """
    check_head_fits(params, meta, f"step {step} in {manager.directory}")
    arrays = {"params": params, "batch_stats": batch_stats}
    json_items = {"meta": meta}
    if opt_state is not None:
        arrays["opt_state"] = opt_state
    if data_state is not None:
        json_items["data_state"] = data_state
    # Hashed now, before the caller's next step may donate the arrays' buffers.
    sums = checksums(arrays, json_items)
    items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
    items.update({name: ocp.args.JsonSave(value) for name, value in json_items.items()})
    items["checksums"] = ocp.args.JsonSave(sums)
    manager.save(step, args=ocp.args.Composite(**items))


def restore_training(
    manager: ocp.CheckpointManager,
    abstract_params: PyTree,
    abstract_batch_stats: PyTree,
    abstract_opt_state: PyTree,
    check_meta: Callable[[dict[str, Any], Path], None] | None = None,
) -> tuple[int, dict[str, Any], list[tuple[int, str]]] | None:
    """Restores the newest intact full training checkpoint, or returns None when there is none.

    The abstract trees hold `jax.ShapeDtypeStruct`s (with the wanted shardings), e.g. from
    `jax.eval_shape` of the train-state initialiser. Returns `(step, {'params', 'batch_stats',
    'opt_state', 'data_state', 'meta'}, damaged)`, damaged: [(step, why)] of the newer steps
    skipped as damaged (each also named in a warning); optax state types are preserved.
    check_meta(meta, step_dir) may refuse a step (another config's, say): its error is raised,
    not skipped over.
    """
    if manager.latest_step() is None:
        return None
    root = Path(manager.directory)

    def restore(step: int) -> dict[str, Any]:
        _check_items(manager, step, root, ("params", "batch_stats", "opt_state", "data_state"))
        meta, recorded = _open_step(root, step)
        step_dir = root / str(step)
        if check_meta is not None:
            check_meta(meta, step_dir)
        data_state = _read_json_item(step_dir, "data_state")
        _check_fits(manager, step, root, abstract_params, abstract_batch_stats, "the train state")
        arrays = {
            "params": abstract_params,
            "batch_stats": abstract_batch_stats,
            "opt_state": abstract_opt_state,
        }
        json_items = {"meta": meta, "data_state": data_state}
        return _restore_verified(manager, root, step, arrays, recorded, json_items) | json_items

    return _newest_intact(manager, root, None, restore)


def _damaged(step_dir: Path, problem: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(
        f"{step_dir}: checkpoint step {step_dir.name} is damaged: {problem}"
    )


def _read_json_item(step_dir: Path, item: str) -> Any:
    """The value of JSON item `item` of a step; CheckpointDamagedError naming the file when it
    is missing or not valid JSON."""
    try:
        return jsonio.read_json(step_dir / item / JSON_FILE, f"checkpoint item {item}")
    except (FileNotFoundError, ValueError) as error:
        raise _damaged(step_dir, str(error)) from None


def _open_step(root: Path, step: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(meta, its recorded checksums, or None for a format-1 step) of `step`, once the JSON that
    orbax reads to restore it (each array item's `_METADATA`) is known to be valid JSON.
    CheckpointDamagedError names the file that is not; a format-1 step is named in a warning
    (it is restored unverified)."""
    step_dir = Path(root) / str(step)
    meta = _read_json_item(step_dir, "meta")
    if not isinstance(meta, dict):
        raise _damaged(step_dir, f"{step_dir / 'meta' / JSON_FILE} holds no JSON object")
    _check_format(meta, step_dir)
    # Every array item, even one this restore leaves alone: orbax's `item_metadata` (the fit
    # check) reads them all.
    for item in ARRAY_ITEMS:
        path = step_dir / item / "_METADATA"
        if (step_dir / item).is_dir():
            try:
                jsonio.read_json(path, "orbax array metadata")
            except (FileNotFoundError, ValueError) as error:
                raise _damaged(step_dir, str(error)) from None
    if (step_dir / "checksums").is_dir():
        recorded = _read_json_item(step_dir, "checksums")
        if not isinstance(recorded, dict):
            raise _damaged(step_dir, f"{step_dir / 'checksums' / JSON_FILE} holds no JSON object")
        return meta, recorded
    if meta["format_version"] >= 2:
        raise _damaged(step_dir, "its checksums item is missing")
    log.warning(
        "%s: written before checkpoints carried checksums (format 1); restored unverified",
        step_dir,
    )
    return meta, None


def _restore_verified(
    manager: ocp.CheckpointManager,
    root: Path,
    step: int,
    abstract: dict[str, PyTree],
    recorded: dict[str, Any] | None,
    json_items: dict[str, Any],
) -> dict[str, Any]:
    """The array items `abstract` ({item: tree of `jax.ShapeDtypeStruct`, or None for an empty
    item}) of `step`, checked with the step's JSON items as read (`json_items`) against
    `recorded` (None: format 1, unverified). A read that TensorStore fails, or a value that
    differs (another dtype than saved included), raises CheckpointDamagedError naming the
    array."""
    step_dir = Path(root) / str(step)
    args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
    _drop_abandoned_read_reports()  # before: they can come while the first error is raised
    try:
        restored = dict(manager.restore(step, args=ocp.args.Composite(**args)).items())
    except Exception as error:  # orbax raises TensorStore's read errors as plain Exceptions
        array, detail = read_error(error)
        if array is None:
            raise
        raise _damaged(step_dir, f"array {array} cannot be read ({detail})") from None
    if recorded is not None:
        problems = mismatches(recorded, restored, json_items)
        if problems:
            raise _damaged(step_dir, listing(problems, 3))
    return restored


def _is_abandoned_read(error: BaseException | None) -> bool:
    """True for what an abandoned read of a failed restore leaves (`_drop_abandoned_read_reports`):
    its result reaching orbax's closed event loop, or its own read error."""
    text = str(error)
    return (isinstance(error, RuntimeError) and text == "Event loop is closed") or (
        text.startswith("Encountered error while reading array index")
        or read_error(error)[0] is not None
    )


class _AbandonedReadFilter(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" records of abandoned reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or not _is_abandoned_read(error)


def _drop_abandoned_read_reports() -> None:
    """When a restore fails, TensorStore still finishes the reads orbax stopped waiting for:
    their results reach orbax's closed event loop and their own errors are never retrieved.
    Python and asyncio report each on stderr (unraisable exceptions, "Future exception was never
    retrieved"), around the tool's one-line error; those reports, and only those, are dropped
    from the first restore on (a restore that succeeds leaves none)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable: Any) -> None:
        try:
            abandoned = _is_abandoned_read(unraisable.exc_value)
        except Exception:  # noqa: BLE001  (at interpreter exit: report it as Python would)
            abandoned = False
        if not abandoned:
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_AbandonedReadFilter())


def _newest_intact(
    manager: ocp.CheckpointManager,
    root: Path,
    step: int | None,
    restore: Callable[[int], T],
) -> tuple[int, T, list[tuple[int, str]]]:
    """(step, restore(step), []) for a given `step`; without one, (s, restore(s), damaged) for
    the newest step s that `restore` does not find damaged, damaged: [(newer step, why)], each
    named in a warning. CheckpointDamagedError when no step is intact."""
    steps = manager.all_steps()
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{root}: no finished step {step} (steps {list(steps)})")
        return step, restore(step), []
    if not steps:
        raise CheckpointError(f"{root}: holds no finished checkpoint step")
    damaged: list[tuple[int, str]] = []
    for candidate in sorted(steps, reverse=True):
        try:
            result = restore(candidate)
        except CheckpointDamagedError as error:
            log.warning("%s; trying an older step", error)
            damaged.append((candidate, str(error)))
            continue
        if damaged:
            log.warning(
                "%s: using step %d, the newest intact step (damaged: %s)",
                root,
                candidate,
                ", ".join(str(s) for s, _ in damaged),
            )
        return candidate, result, damaged
    raise CheckpointDamagedError(
        f"{root}: every checkpoint step is damaged ({', '.join(str(s) for s, _ in damaged)}); "
        f"the newest: {damaged[0][1]}"
    )


def check_config_name(meta: dict[str, Any], config_name: str, step_dir: Path, remedy: str) -> None:
    """CheckpointError naming both configs when `meta` records another config than
    `config_name`; `remedy` says what to do instead."""
    if meta.get("config_name") != config_name:
        raise CheckpointError(
            f"{step_dir}: holds a checkpoint of config {meta.get('config_name')!r}, not "
            f"{config_name!r}; {remedy}"
        )


def check_output_free(directory: str | Path) -> None:
    """Raises CheckpointError if `<directory>/checkpoints` exists and is not empty."""
    root = Path(directory).absolute() / CHECKPOINT_SUBDIR
    if root.exists() and any(root.iterdir()):
        raise CheckpointError(f"{root} already exists and is not empty; choose another directory")


def save_converted(
    directory: str | Path, params: PyTree, batch_stats: PyTree, meta: dict[str, Any]
) -> Path:
    """Writes converted weights as step 0 of `<directory>/checkpoints`; returns that path.

    Refuses to write into an existing non-empty `checkpoints` directory.
    """
    check_output_free(directory)
    check_head_fits(params, meta, directory)  # before the directory is made
    manager = checkpoint_manager(directory)
    save(manager, 0, params, batch_stats, meta)
    manager.wait_until_finished()
    manager.close()
    return Path(directory).absolute() / CHECKPOINT_SUBDIR


def resolve_checkpoint(path: str | Path) -> tuple[Path, int | None]:
    """(`checkpoints` directory, step) of a converted directory, a training workdir or a
    `checkpoints` directory (step None: the newest intact step), or of one step directory
    `<dir>/checkpoints/<step>` (that step)."""
    path = Path(path).absolute()
    if (path / CHECKPOINT_SUBDIR).is_dir():
        return path / CHECKPOINT_SUBDIR, None
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        return path, None
    if path.is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    raise CheckpointError(f"{path}: not a checkpoint directory (no {CHECKPOINT_SUBDIR}/<step>)")


OTHER_CONFIG_REMEDY = (
    "use the config it was trained with, or allow_other_config_name "
    "(--allow_other_config_name) to use it under this name: the architecture is the same"
)


def restore_inference(
    path: str | Path,
    config: ml_collections.ConfigDict,
    sharding: jax.sharding.Sharding | None = None,
    *,
    allow_other_config_name: bool = False,
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """`({'params', 'batch_stats'}, meta)` of `restore_inference_step`."""
    _, variables, meta = restore_inference_step(
        path, config, sharding, allow_other_config_name=allow_other_config_name
    )
    return variables, meta


def restore_inference_step(
    path: str | Path,
    config: ml_collections.ConfigDict,
    sharding: jax.sharding.Sharding | None = None,
    *,
    allow_other_config_name: bool = False,
) -> tuple[int, dict[str, PyTree], dict[str, Any]]:
    """Restores `(step, {'params', 'batch_stats'}, meta)` of a verified step under `path`.

    `path`: a converted directory or a training workdir (either holds `checkpoints/<step>`), or
    the `checkpoints` directory itself: its newest intact step; or one step directory: that step
    (module docstring). Arrays are placed with `sharding` (default: replicated over all
    devices). `model.head.num_classes = 0` takes the class count of the checkpoint's meta.
    Raises CheckpointError naming the path and the mismatching keys and shapes when the
    checkpoint does not fit `config.model`, and naming both configs when it fits but was made
    for another config name (unless `allow_other_config_name`).
    """
    root, explicit_step = resolve_checkpoint(path)
    manager = ocp.CheckpointManager(root, item_handlers=_handlers())
    if sharding is None:
        sharding = mesh_lib.replicated(mesh_lib.make_mesh())

    def restore(step: int) -> tuple[dict[str, PyTree], dict[str, Any]]:
        step_dir = root / str(step)
        _check_items(manager, step, root, ("params", "batch_stats", "meta"))
        meta, recorded = _open_step(root, step)
        _check_parts(meta, step_dir)
        step_config = config
        if int(config.model.head.num_classes) == 0:  # the head takes the checkpoint's count
            step_config = resolve_num_classes(config, from_meta(meta, str(step_dir)), str(step_dir))
        expected = abstract_variables(step_config.model)
        _check_fits(
            manager,
            step,
            root,
            expected["params"],
            expected["batch_stats"],
            f"config {config.name!r} (checkpoint made for {meta.get('config_name', '?')!r})",
        )
        if not allow_other_config_name:
            check_config_name(meta, config.name, step_dir, OTHER_CONFIG_REMEDY)
        arrays = {
            name: mesh_lib.abstract(expected[name], sharding) for name in ("params", "batch_stats")
        }
        restored = _restore_verified(manager, root, step, arrays, recorded, {"meta": meta})
        return {"params": restored["params"], "batch_stats": restored["batch_stats"]}, meta

    try:
        step, (variables, meta), _ = _newest_intact(manager, root, explicit_step, restore)
    finally:
        manager.close()
    return step, variables, meta


def restore_weights(
    path: str | Path, step: int | None = None
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """`({'params', 'batch_stats'}, meta)` of `step` under `path` as stored, verified (default:
    the step a step directory names, else the newest intact step).

    No model check (for `config.init_from`, where the caller merges what fits): the trees are
    whatever the checkpoint holds, e.g. only `backbone` for an ImageNet conversion. Arrays land
    on this process's first device whatever topology saved them (a multi-process run included).
    """
    root, explicit_step = resolve_checkpoint(path)
    step = explicit_step if step is None else step
    manager = ocp.CheckpointManager(root, item_handlers=_handlers())
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def restore(step: int) -> tuple[dict[str, PyTree], dict[str, Any]]:
        _check_items(manager, step, root, ("params", "batch_stats", "meta"))
        meta, recorded = _open_step(root, step)
        metadata = manager.item_metadata(step)

        def target(name: str) -> PyTree:
            tree = getattr(metadata[name], "tree", metadata[name])
            return mesh_lib.abstract(tree, device) if tree else None

        arrays = {name: target(name) for name in ("params", "batch_stats")}
        restored = _restore_verified(manager, root, step, arrays, recorded, {"meta": meta})
        variables = {
            "params": restored["params"] or {},
            "batch_stats": restored["batch_stats"] or {},
        }
        return variables, meta

    try:
        _, result, _ = _newest_intact(manager, root, step, restore)
    finally:
        manager.close()
    return result


def _check_items(
    manager: ocp.CheckpointManager, step: int, root: Path, names: tuple[str, ...]
) -> None:
    step_dir = Path(root) / str(step)
    missing = [name for name in names if not (step_dir / name).is_dir()]
    if missing:
        raise CheckpointError(f"{step_dir}: checkpoint lacks the item(s) {', '.join(missing)}")


def _check_format(meta: dict[str, Any], step_dir: Path) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{step_dir}: meta format_version {version!r} is not supported (<= {FORMAT_VERSION})"
        )


def _check_parts(meta: dict[str, Any], step_dir: Path) -> None:
    parts = meta.get("parts", list(MODEL_PARTS))
    if set(parts) != set(MODEL_PARTS):
        raise CheckpointError(
            f"{step_dir}: holds only {', '.join(parts)} weights ({meta.get('source', '?')}); "
            "use it as config.init_from to start training, not for inference"
        )


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    tree = getattr(tree, "tree", tree)  # orbax TreeMetadata wraps the tree
    flat = traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}
    return {k: tuple(v.shape) for k, v in flat.items()}


def listing(items: Sequence[str], limit: int = 4) -> str:
    """'a, b, c (+2 more)': the first `limit` items and how many more there are."""
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def join_problems(groups: Sequence[tuple[str, Sequence[str], int]]) -> str:
    """'label a, b; label c' for each (label, items, limit) group with items, '' when none."""
    return "; ".join(f"{label} {listing(items, limit)}" for label, items, limit in groups if items)


def describe_mismatch(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], limit: int = 4
) -> str:
    """'missing a, b; unexpected c; shape d (1, 2) vs expected (2, 1)' or '' when they agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k} {found[k]} vs expected {expected[k]}"
        for k in sorted(set(found) & set(expected))
        if found[k] != expected[k]
    ]
    return join_problems(
        [("missing", missing, limit), ("unexpected", unexpected, limit), ("shape", wrong, limit)]
    )


def _check_fits(
    manager: ocp.CheckpointManager,
    step: int,
    root: Path,
    expected_params: PyTree,
    expected_batch_stats: PyTree,
    model_description: str,
) -> None:
    metadata = manager.item_metadata(step)
    problems = []
    for name, expected in (("params", expected_params), ("batch_stats", expected_batch_stats)):
        mismatch = describe_mismatch(_shapes(metadata[name]), _shapes(expected))
        if mismatch:
            problems.append(f"{name}: {mismatch}")
    if problems:
        raise CheckpointError(
            f"{Path(root) / str(step)}: checkpoint does not fit the model of {model_description}: "
            + " | ".join(problems)
        )
