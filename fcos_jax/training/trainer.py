"""The training loop of `train.py`: the step, and the cadence of reports, checkpoints, evaluation.

`train_and_evaluate(config, workdir)`:
  * builds the training pipeline (this process's share of every global batch), the model and
    the optimizer (`optim`) from the config;
  * takes its first state from `TrainCheckpoints.restore_or_initialize`: the workdir's newest
    intact checkpoint, or the initialisation with `config.init_from`'s weights, or the
    initialisation;
  * runs the jitted data-parallel step (`train_step`) on every device of every process;
  * puts the next batches on the devices while a step runs, and reads the metrics of step s
    while step s + 1 runs, so the step never waits for the host;
  * reports loss components, lr, images/s and ETA (`TrainLog`), saves a checkpoint every
    `train.checkpoint_every` steps and at the end, evaluates every `train.eval_every` steps and
    at the end;
  * stops on a non-finite loss or state with one line naming the step and the newest good
    checkpoint. A checkpoint is written only for a finite state (the step's `state_finite`,
    read with the step's other metrics); the loss computed on a checkpoint's state is known
    one step later, and a checkpoint whose loss is not finite is moved aside, so the workdir's
    latest checkpoint is one a run can go on from. The workdir is locked for the run
    (`workdir_lock`): one writer per workdir.

What a run starts from and saves (`TrainCheckpoints`): the newest intact checkpoint of the
workdir, or `config.init_from` merged into the initialisation; a step every
`train.checkpoint_every`. The loop is its one user; the files are `checkpoint/store.py`'s.

What a run reports, on process 0 only (`TrainLog`): TensorBoard scalars in
`<workdir>/tensorboard` through TensorFlow's summary API, and tqdm's progress bar with loss
components, lr and images/s; without the bar (`train.progress_bar = False`) the same text is
logged with the ETA. Images/s is measured over the steps dispatched since the last report. Why
not clu's metric writers and periodic actions: docs/architecture.md#reporting.
"""

import collections
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
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
from fcos_jax.data import pipeline as data_pipeline
from fcos_jax.evaluation.evaluator import Evaluator
from fcos_jax.models import build_model
from fcos_jax.parallel import sharding
from fcos_jax.training import optim, train_step, workdir_lock
from fcos_jax.training.errors import NonFiniteStepError

log = logging.getLogger(__name__)
PyTree = Any

TRAIN_INPUTS = ("image", "boxes", "labels", "box_valid")
# Global batches put on the devices ahead of the step that takes them.
DEVICE_PREFETCH = 2
LOSS_TERMS = ("loss", "loss_cls", "loss_bbox", "loss_centerness")
TRAIN_SOURCE = "fcos_jax train.py"  # the `source` in a training checkpoint's meta


class TrainCheckpoints:
    """The checkpoints of one training run in `<workdir>/checkpoints`.

    It holds the workdir's orbax manager and the meta (config name, class list) written with
    every step (the layout is `checkpoint/store.py`'s):
      * `restore_or_initialize` gives the run's first train state, replicated on the mesh: the
        workdir's newest intact checkpoint (newer damaged steps are moved aside, with a
        warning) with everything (params, BN statistics, optimizer, data iterator), restored
        onto this run's devices whatever process and device count wrote it; else the model's
        initialisation from `config.seed` with `config.init_from`'s weights merged in (params
        and BN statistics only; a leaf of another shape, e.g. a head with another class count,
        keeps its initialisation and is said so); else the initialisation alone.
      * `save` writes a step asynchronously (the previous save is finished first);
      * `set_aside` moves a checkpoint no run should go on from out of the step list.
    """

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


def _check_finite(step: int, metrics: dict[str, float], checkpoints: TrainCheckpoints) -> None:
    """Raises NonFiniteStepError (one line) when step `step`'s loss or new state is not finite.

    The loss of step s is computed on the state of step s - 1: when it is not finite, checkpoint
    s - 1 (if written) is a state training cannot go on from, and is moved aside first."""
    loss_finite = all(math.isfinite(metrics[k]) for k in LOSS_TERMS)
    if loss_finite and metrics["state_finite"]:
        return
    losses = ", ".join(f"{k} {metrics[k]:.4g}" for k in LOSS_TERMS)
    if loss_finite:
        what = f"the update made the parameters or optimizer state non-finite ({losses})"
    else:
        what = f"non-finite loss ({losses}, computed on the state of step {step - 1})"
    moved = ""
    if not loss_finite and checkpoints.latest_step == step - 1:
        moved = f"; checkpoint {step - 1} was moved aside to {checkpoints.set_aside(step - 1)}"
    kept = checkpoints.latest_step
    good = (
        f"the newest checkpoint with a finite state and loss is step {kept} "
        f"({checkpoints.step_dir(kept)}): resume from it with a lower optim.base_lr"
        if kept is not None
        else "no checkpoint with a finite state and loss is left"
    )
    raise NonFiniteStepError(
        f"step {step}: {what}, lr {metrics['lr']:.3g}; training stopped{moved}; {good}"
    )


def format_metrics(metrics: dict[str, float], images_per_s: float) -> str:
    """'loss 1.2345 (cls ... box ... ctr ...) pos 12 lr 1.00e-02 34.5 img/s'."""
    return (
        f"loss {metrics['loss']:.4f} (cls {metrics['loss_cls']:.4f} "
        f"box {metrics['loss_bbox']:.4f} ctr {metrics['loss_centerness']:.4f}) "
        f"pos {metrics['num_pos']:.0f} lr {metrics['lr']:.2e} {images_per_s:.1f} img/s"
    )


class TrainLog:
    """The reports of one run from `start_step` to `num_steps` (module docstring)."""

    def __init__(
        self,
        workdir: Path,
        num_steps: int,
        start_step: int,
        batch_size: int,
        lead: bool,
        progress_bar: bool,
    ) -> None:
        self.num_steps, self.batch_size, self.lead = num_steps, batch_size, lead
        self._writer = self._bar = None
        if lead:
            import tensorflow as tf  # the metric writer is TF's summary API

            self._tf = tf
            self._writer = tf.summary.create_file_writer(str(workdir / "tensorboard"))
        if lead and progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._window_start, self._window_images = time.perf_counter(), 0

    def dispatched(self) -> None:
        """Counts one more global batch towards images/s."""
        self._window_images += self.batch_size

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """Reports the metrics of `step`; starts a new images/s window."""
        elapsed = time.perf_counter() - self._window_start
        rate = self._window_images / max(elapsed, 1e-9)
        text = format_metrics(metrics, rate)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=True)
        self.scalars(step, dict(metrics, images_per_second=rate))
        if self.lead and self._bar is None:
            eta = (self.num_steps - step) * elapsed / max(self._window_images, 1) * self.batch_size
            log.info("step %d/%d %s eta %.0fs", step, self.num_steps, text, eta)
        self._window_start, self._window_images = time.perf_counter(), 0

    def evaluation(self, step: int, stats: dict[str, float], report: str) -> None:
        """Prints an evaluation's report and writes its stats as `eval/<name>` scalars."""
        if self.lead:
            print(f"evaluation at step {step}:\n{report}", flush=True)
            self.scalars(step, {f"eval/{k}": v for k, v in stats.items()})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Writes TensorBoard scalars at `step` and flushes them."""
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for name, value in values.items():
                self._tf.summary.scalar(name, value)
        self._writer.flush()

    def close_progress(self) -> None:
        """Closes the progress bar (the scalars stay writable, for the final evaluation)."""
        if self._bar is not None:
            self._bar.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Trains `config` in `workdir` (module docstring). Returns the final evaluation's stats
    ({} when `train.eval_at_end` is off, and on processes other than 0).

    The process is the caller's to set up (`train.py`: `cli.start_jax` starts jax.distributed
    and turns on the compilation cache of `test.compilation_cache_dir`)."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir_lock.WorkdirLock(workdir)
    # Process 0 holds the lock for the whole run; the others wait and fail with its reason.
    sharding.run_once_per_directory(lock.acquire, workdir, "locking the workdir")
    try:
        return _train_and_evaluate(config, workdir)
    finally:
        lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, float]:
    lead = jax.process_index() == 0
    mesh = sharding.make_mesh()
    t = config.train
    if int(t.batch_size) % (int(t.accumulate_steps) * mesh.size):
        raise ValueError(
            f"train.batch_size {t.batch_size} must divide into train.accumulate_steps "
            f"{t.accumulate_steps} micro-batches over {mesh.size} devices"
        )
    pipeline = data_pipeline.TrainPipeline(
        config, process_index=jax.process_index(), process_count=jax.process_count()
    )
    # model.head.num_classes = 0: as many classes as the training data has.
    config = class_lists.resolve_num_classes(
        config, pipeline.classes, f"data.classes of {pipeline.source}"
    )
    # Built before the model: a validation split that cannot be read stops the run now.
    evaluates = int(t.eval_every) > 0 or bool(t.get("eval_at_end", True))
    evaluator = Evaluator(config, mesh, classes=pipeline.classes) if evaluates else None
    steps_per_epoch = pipeline.steps_per_epoch
    num_steps = optim.total_steps(config, steps_per_epoch)
    model = build_model(config.model)
    canvas = pipeline.canvases[0]
    # The optimizer's parameter groups need only the names and shapes of the parameters.
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *canvas, 3)))
    optimizer, schedule, labels = optim.build_optimizer(config, shapes["params"], steps_per_epoch)
    checkpoints = TrainCheckpoints(workdir, config, pipeline.classes)
    start_step, state, data_state = checkpoints.restore_or_initialize(
        model, optimizer, mesh, canvas
    )
    if data_state is not None:
        pipeline.restore(data_state)
    step_fn = train_step.jit_train_step(
        train_step.make_train_step(config, model, optimizer, schedule, labels, mesh), mesh
    )

    def evaluate(state: train_step.TrainState, step: int) -> dict[str, float]:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        stats, text = evaluator.evaluate(variables)
        train_log.evaluation(step, stats, text)
        return stats

    log_every = max(int(t.log_every), 1)
    checkpoint_every = int(t.checkpoint_every)
    eval_every = int(t.eval_every)
    pending = None  # (step, metrics on device) of the step before the current one
    stats: dict[str, float] = {}
    train_log = TrainLog(
        workdir,
        num_steps,
        start_step,
        int(t.batch_size),
        lead=lead,
        progress_bar=bool(t.get("progress_bar", True)),
    )

    last_read: tuple[int, dict[str, float]] | None = None

    def read(pending_item) -> dict[str, float]:
        """The step's metrics on the host, checked finite; fetched once (a step read before its
        checkpoint is not fetched again for its report)."""
        nonlocal last_read
        step, device_metrics = pending_item
        if last_read is None or last_read[0] != step:
            metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            _check_finite(step, metrics, checkpoints)
            del metrics["state_finite"]  # checked; not a quantity to plot
            last_read = (step, metrics)
        return last_read[1]

    # Global batches already on the devices, each with the pipeline state after it (what a
    # checkpoint after its step records), so that no step waits for its input's transfer.
    ahead: collections.deque = collections.deque()
    loaded = start_step

    def load_ahead() -> None:
        nonlocal loaded
        while len(ahead) < DEVICE_PREFETCH and loaded < num_steps:
            batch = next(pipeline)
            global_batch = sharding.to_global({k: batch[k] for k in TRAIN_INPUTS}, mesh)
            ahead.append((global_batch, pipeline.state()))
            loaded += 1

    try:
        load_ahead()
        for step in range(start_step, num_steps):
            global_batch, data_state = ahead.popleft()
            state, metrics = step_fn(state, global_batch)
            train_log.dispatched()
            load_ahead()  # the next batch travels while this step runs
            done = step + 1
            if pending is not None:
                previous = read(pending)
                if pending[0] % log_every == 0 or pending[0] == 1:
                    train_log.step(pending[0], previous)
            pending = (done, metrics)
            last = done == num_steps
            save_now = last or (checkpoint_every > 0 and done % checkpoint_every == 0)
            eval_now = eval_every > 0 and done % eval_every == 0 and not last
            # Never checkpoint or evaluate a non-finite state. The last step has no next step
            # to overlap its report with: it is reported now.
            if last:
                train_log.step(done, read(pending))
            elif save_now or eval_now:
                read(pending)
            if save_now:
                checkpoints.save(done, state, data_state)
            if eval_now:
                stats = evaluate(state, done)
        checkpoints.wait_until_finished()
    finally:
        train_log.close_progress()
        checkpoints.close()
    if t.get("eval_at_end", True):
        stats = evaluate(state, num_steps)
    return stats
