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

What a run reports, on process 0 only (`TrainLog`): TensorBoard scalars in
`<workdir>/tensorboard` through TensorFlow's summary API, and tqdm's progress bar with loss
components, lr and images/s; without the bar (`train.progress_bar = False`) the same text is
logged with the ETA. Images/s is measured over the steps dispatched since the last report. Why
not clu's metric writers and periodic actions: docs/architecture.md#reporting.
"""

import collections
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from fcos_jax.config import classes as class_lists
from fcos_jax.data import pipeline as data_pipeline
from fcos_jax.evaluation.evaluator import Evaluator
from fcos_jax.models import build_model
from fcos_jax.parallel import sharding
from fcos_jax.training import optim, train_step, workdir_lock
from fcos_jax.training.checkpoints import TrainCheckpoints
from fcos_jax.training.errors import NonFiniteStepError

log = logging.getLogger(__name__)

TRAIN_INPUTS = ("image", "boxes", "labels", "box_valid")
# Global batches put on the devices ahead of the step that takes them.
DEVICE_PREFETCH = 2


LOSS_TERMS = ("loss", "loss_cls", "loss_bbox", "loss_centerness")


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
