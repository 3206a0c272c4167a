"""Orbax checkpoints: `<dir>/checkpoints/<step>/{params, batch_stats, opt_state, data_state, meta}`.

One layout for trained and converted weights (docs/architecture.md#checkpoints):
  params       Flax `params` tree (float32).
  batch_stats  Flax `batch_stats` tree (frozen BN running mean/var).
  opt_state    optax state (training checkpoints only).
  data_state   JSON dict of the data pipeline's position (training checkpoints only).
  meta         JSON: format version, config name, source, parts held, class list
               `[[category_id, name], ...]` in class-channel order.
The converter writes step 0 without `opt_state`/`data_state`. Inference restores only `params`,
`batch_stats` and `meta` from a converted directory or a training workdir (latest step).
"""

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util

from fcos_jax import sharding as mesh_lib
from fcos_jax.classes import ClassList, class_list, from_meta, resolve_num_classes
from fcos_jax.models import build_model

FORMAT_VERSION = 1
CHECKPOINT_SUBDIR = "checkpoints"
MODEL_PARTS = ("backbone", "neck", "bbox_head")
ARRAY_ITEMS = ("params", "batch_stats", "opt_state")
JSON_ITEMS = ("data_state", "meta")

PyTree = Any


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or does not fit the configured model."""


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
    classes: ClassList | None = None,
) -> dict[str, Any]:
    """The `meta` item: format version, config name, source description, parts, class list.

    classes: channel -> (category id, name) of the model (default: the named list
    `config.data.classes`; a dataset's own list must be given). The head must fit it
    (`model.head.num_classes`, or 0 for any number).
    """
    if classes is None:
        if config.data.classes == "dataset":
            raise CheckpointError(
                f"config {config.name!r}: data.classes='dataset' takes the class list from the "
                "data, and none was given"
            )
        classes = class_list(config.data.classes)
    try:
        resolve_num_classes(config, classes, f"config {config.name!r}: data.classes")
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    return {
        "format_version": FORMAT_VERSION,
        "config_name": config.name,
        "source": source,
        "parts": list(parts),
        "classes": [[int(cid), name] for cid, name in classes],
    }


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
    `data_state` must be JSON-serialisable (plain ints, floats, strings, lists, dicts).
    """
    items = {
        "params": ocp.args.StandardSave(params),
        "batch_stats": ocp.args.StandardSave(batch_stats),
        "meta": ocp.args.JsonSave(meta),
    }
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if data_state is not None:
        items["data_state"] = ocp.args.JsonSave(data_state)
    manager.save(step, args=ocp.args.Composite(**items))


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_params: PyTree,
    abstract_batch_stats: PyTree,
    abstract_opt_state: PyTree,
) -> tuple[int, dict[str, Any]] | None:
    """Restores the latest full training checkpoint, or returns None when there is none.

    The abstract trees hold `jax.ShapeDtypeStruct`s (with the wanted shardings), e.g. from
    `jax.eval_shape` of the train-state initialiser. Returns `(step, {'params', 'batch_stats',
    'opt_state', 'data_state', 'meta'})`; optax state types are preserved.
    """
    step = manager.latest_step()
    if step is None:
        return None
    directory = Path(manager.directory)
    _check_items(manager, step, directory, ("params", "batch_stats", "opt_state", "data_state"))
    _check_fits(manager, step, directory, abstract_params, abstract_batch_stats, "the train state")
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            batch_stats=ocp.args.StandardRestore(abstract_batch_stats),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data_state=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return step, dict(restored.items())


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
    manager = checkpoint_manager(directory)
    save(manager, 0, params, batch_stats, meta)
    manager.wait_until_finished()
    manager.close()
    return Path(directory).absolute() / CHECKPOINT_SUBDIR


def resolve_checkpoint_root(path: str | Path) -> Path:
    """The `checkpoints` directory of a converted directory or workdir, or that directory."""
    path = Path(path).absolute()
    if (path / CHECKPOINT_SUBDIR).is_dir():
        return path / CHECKPOINT_SUBDIR
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    raise CheckpointError(f"{path}: not a checkpoint directory (no {CHECKPOINT_SUBDIR}/<step>)")


def restore_inference(
    path: str | Path,
    config: ml_collections.ConfigDict,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """Restores `({'params', 'batch_stats'}, meta)` of the latest step under `path`.

    `path`: a converted directory or a training workdir (either holds `checkpoints/<step>`), or
    the `checkpoints` directory itself. Arrays are placed with `sharding` (default: replicated
    over all devices). `model.head.num_classes = 0` takes the class count of the checkpoint's
    meta. Raises CheckpointError naming the path and the mismatching keys and shapes when the
    checkpoint does not fit `config.model`.
    """
    root = resolve_checkpoint_root(path)
    manager = ocp.CheckpointManager(root, item_handlers=_handlers())
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"{root}: holds no finished checkpoint step")
    _check_items(manager, step, root, ("params", "batch_stats", "meta"))
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    _check_meta(meta, root / str(step))
    if int(config.model.head.num_classes) == 0:  # the head takes the checkpoint's class count
        where = str(root / str(step))
        config = resolve_num_classes(config, from_meta(meta, where), where)
    expected = abstract_variables(config.model)
    _check_fits(
        manager,
        step,
        root,
        expected["params"],
        expected["batch_stats"],
        f"config {config.name!r} (checkpoint made for {meta.get('config_name', '?')!r})",
    )
    if sharding is None:
        sharding = mesh_lib.replicated(mesh_lib.make_mesh())
    with_sharding = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(with_sharding(expected["params"])),
            batch_stats=ocp.args.StandardRestore(with_sharding(expected["batch_stats"])),
        ),
    )
    manager.close()
    return {"params": restored["params"], "batch_stats": restored["batch_stats"]}, meta


def restore_weights(
    path: str | Path, step: int | None = None
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """`({'params', 'batch_stats'}, meta)` of `step` (default: the latest) under `path`, as stored.

    No model check (for `config.init_from`, where the caller merges what fits): the trees are
    whatever the checkpoint holds, e.g. only `backbone` for an ImageNet conversion. Arrays land
    on this process's first device whatever topology saved them (a multi-process run included).
    """
    root = resolve_checkpoint_root(path)
    manager = ocp.CheckpointManager(root, item_handlers=_handlers())
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{root}: holds no finished checkpoint step")
    if step not in manager.all_steps():
        raise CheckpointError(f"{root}: no step {step} (steps {manager.all_steps()})")
    _check_items(manager, step, root, ("params", "batch_stats", "meta"))
    metadata = manager.item_metadata(step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(name: str) -> ocp.args.StandardRestore:
        tree = getattr(metadata[name], "tree", metadata[name])
        return ocp.args.StandardRestore(
            jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
            if tree
            else None
        )

    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=target("params"),
            batch_stats=target("batch_stats"),
            meta=ocp.args.JsonRestore(),
        ),
    )
    manager.close()
    variables = {"params": restored["params"] or {}, "batch_stats": restored["batch_stats"] or {}}
    return variables, restored["meta"]


def _check_items(
    manager: ocp.CheckpointManager, step: int, root: Path, names: tuple[str, ...]
) -> None:
    step_dir = Path(root) / str(step)
    missing = [name for name in names if not (step_dir / name).is_dir()]
    if missing:
        raise CheckpointError(f"{step_dir}: checkpoint lacks the item(s) {', '.join(missing)}")


def _check_meta(meta: dict[str, Any], step_dir: Path) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{step_dir}: meta format_version {version!r} is not supported (<= {FORMAT_VERSION})"
        )
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
