"""A training workdir's checkpoints: the state a run starts from and the states it saves.

`TrainCheckpoints(workdir, config, classes)` holds the workdir's orbax manager and the meta
(config name, class list) written with every step (the layout is `checkpoint/store.py`'s):
  * `restore_or_initialize` gives the run's first train state, replicated on the mesh: the
    workdir's newest intact checkpoint (newer damaged steps are moved aside, with a warning)
    with everything (params, BN statistics, optimizer, data iterator), restored onto this run's
    devices whatever process and device count wrote it; else the model's initialisation from
    `config.seed` with `config.init_from`'s weights merged in (params and BN statistics only; a
    leaf of another shape, e.g. a head with another class count, keeps its initialisation and
    is said so); else the initialisation alone.
  * `save` writes a step asynchronously (the previous save is finished first);
  * `set_aside` moves a checkpoint no run should go on from out of the step list.
"""

import functools
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fcos_jax.checkpoint import store
from fcos_jax.config import classes as class_lists
from fcos_jax.config.classes import ClassList
from fcos_jax.parallel import sharding
from fcos_jax.training import train_step

log = logging.getLogger(__name__)
PyTree = Any
TRAIN_SOURCE = "fcos_jax train.py"


class TrainCheckpoints:
    """The checkpoints of one training run in `<workdir>/checkpoints` (module docstring)."""

    def __init__(
        self, workdir: str | Path, config: ml_collections.ConfigDict, classes: ClassList
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.config = config
        self.classes = list(classes)
        self.meta = store.make_meta(config, source=TRAIN_SOURCE, classes=classes)
        keep = int(config.train.keep_checkpoints)
        if keep < 2:
            raise ValueError(
                f"train.keep_checkpoints: expected >= 2, got {keep} (the checkpoint before the "
                "newest is kept until a step on the newest has had a finite loss)"
            )
        self.manager = store.checkpoint_manager(self.workdir, max_to_keep=keep)

    @property
    def latest_step(self) -> int | None:
        """The latest finished step in the workdir, or None."""
        return self.manager.latest_step()

    def restore_or_initialize(
        self,
        model: nn.Module,
        optimizer: optax.GradientTransformation,
        mesh: Mesh,
        image_hw: tuple[int, int],
    ) -> tuple[int, train_step.TrainState, dict[str, Any] | None]:
        """(first step, state replicated on `mesh`, data iterator state to restore or None).

        image_hw: an input size for the model's initialisation (its parameters do not depend
        on it).
        """
        create = jax.jit(
            functools.partial(train_step.create_train_state, model, optimizer, image_hw=image_hw)
        )
        rng = jax.random.PRNGKey(int(self.config.seed))
        lead = jax.process_index() == 0
        if self.latest_step is not None:
            step, state, data_state = self._resume(jax.eval_shape(create, rng), mesh)
            if lead:
                log.info("resumed %s at step %d", self.workdir, step)
            return step, state, data_state
        state = create(rng)
        source = self.config.init_from
        if source:
            loaded, loaded_meta = store.restore_weights(source)
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            variables, report = merge_init_weights(variables, loaded, source)
            state = state.replace(
                params=variables["params"],
                batch_stats=variables["batch_stats"],
                opt_state=optimizer.init(variables["params"]),
            )
            if lead:
                log.info("initialised from %s (%s)", source, loaded_meta.get("source", "?"))
                for line in report:
                    log.info("  %s", line)
        return 0, sharding.replicate(state, mesh), None

    def save(self, step: int, state: train_step.TrainState, data_state: dict[str, Any]) -> None:
        """Starts an asynchronous save of `state` at `step`, after the previous one finished."""
        self.manager.wait_until_finished()
        store.save(
            self.manager,
            step,
            state.params,
            state.batch_stats,
            self.meta,
            opt_state=state.opt_state,
            data_state=data_state,
        )

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()

    def step_dir(self, step: int) -> Path:
        """`<workdir>/checkpoints/<step>`."""
        return Path(self.manager.directory) / str(step)

    def set_aside(self, step: int, reason: str = "nonfinite-loss") -> Path:
        """Moves checkpoint `step` to `<step>.<reason>` (orbax reads only integer names as
        steps), so no run resumes from it and rotation never counts it; returns the new path.
        Process 0 moves it once its save has finished; every process then re-reads the steps."""
        self.manager.wait_until_finished()
        source = self.step_dir(step)
        target, n = source.with_name(f"{step}.{reason}"), 1
        while target.exists():
            n += 1
            target = source.with_name(f"{step}.{reason}.{n}")
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"fcos_jax: checkpoint {step} set aside")
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.close()

    def _resume(
        self, abstract: train_step.TrainState, mesh: Mesh
    ) -> tuple[int, train_step.TrainState, dict[str, Any]]:
        """(step, state, data state) of the newest intact checkpoint, restored with the shardings
        of this run's mesh (replicated); refused when another config or class list wrote it.
        Newer damaged steps are moved aside (`<step>.damaged`), out of the way of this run's
        saves, with a warning."""
        abstract = sharding.abstract(abstract, sharding.replicated(mesh))
        step, items, damaged = store.restore_training(
            self.manager,
            abstract.params,
            abstract.batch_stats,
            abstract.opt_state,
            check_meta=self._check_meta,
        )
        for bad_step, _ in damaged:
            moved = self.set_aside(bad_step, "damaged")
            if jax.process_index() == 0:
                log.warning("damaged checkpoint step %d moved aside to %s", bad_step, moved)
        state = train_step.TrainState(
            step=np.asarray(step, np.int32),
            params=items["params"],
            batch_stats=items["batch_stats"] or {},
            opt_state=items["opt_state"],
        )
        return step, sharding.replicate(state, mesh), items["data_state"]

    def _check_meta(self, meta: dict[str, Any], step_dir: Path) -> None:
        """Refuses a checkpoint of another config or class list."""
        store.check_config_name(
            meta, self.config.name, step_dir, "use another --workdir (or the same config) to go on"
        )
        if "classes" in meta and class_lists.from_meta(meta, str(step_dir)) != self.classes:
            raise store.CheckpointError(
                f"{step_dir}: the workdir was trained on other classes than the data has now "
                f"({len(meta['classes'])} vs {len(self.classes)}: channel -> category id, name); "
                "use another --workdir for this data"
            )


def _flat(tree: PyTree) -> dict[str, Any]:
    return traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}


def merge_init_weights(
    fresh: dict[str, PyTree], loaded: dict[str, PyTree], source: str
) -> tuple[dict[str, PyTree], list[str]]:
    """Fresh variables with every leaf the loaded checkpoint has at the same path and shape.

    Returns (merged variables, report lines). A leaf of another shape (e.g. `conv_cls` of a head
    with another class count) keeps its initialisation; so does a part the source lacks (neck and
    head of a backbone-only checkpoint). Loaded leaves the model has no place for are an error.
    """
    merged, report = {}, []
    for collection in ("params", "batch_stats"):
        fresh_flat, loaded_flat = _flat(fresh.get(collection, {})), _flat(loaded.get(collection))
        unknown = sorted(set(loaded_flat) - set(fresh_flat))
        if unknown:
            raise ValueError(
                f"config.init_from={source}: {collection} has entries this model lacks: "
                f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
            )
        out, kept_init, reshaped = {}, [], []
        for key, value in fresh_flat.items():
            if key not in loaded_flat:
                out[key] = value
                kept_init.append(key)
            elif tuple(loaded_flat[key].shape) != tuple(value.shape):
                out[key] = value
                reshaped.append(f"{key} {tuple(loaded_flat[key].shape)} -> {tuple(value.shape)}")
            else:
                out[key] = np.asarray(loaded_flat[key], dtype=value.dtype)
        merged[collection] = traverse_util.unflatten_dict(out, sep="/") if out else {}
        if kept_init:
            parts = sorted({k.split("/")[0] for k in kept_init})
            report.append(
                f"{collection}: {len(kept_init)} entries not in {source} keep their "
                f"initialisation (in {', '.join(parts)})"
            )
        for line in reshaped:
            report.append(f"{collection}: {line} re-initialised (another shape in {source})")
    return merged, report
