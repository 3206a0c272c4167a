"""The training loop of `train.py`: data, model, optimizer, checkpoints, logging, evaluation.

`train_and_evaluate(config, workdir)`:
  * builds the training pipeline (this process's share of every global batch), the model and
    the optimizer from the config;
  * resumes the workdir's latest checkpoint with everything (params, BN statistics, optimizer,
    data iterator), or starts from `config.init_from` (a converted or trained checkpoint: its
    params only; a head with another class count is re-initialised and said so), or from the
    model's initialisation;
  * runs the jitted data-parallel step (`train_lib`) on every device of every process;
  * reads the metrics of step s while step s + 1 runs, so the step never waits for the host;
  * logs loss components, lr, images/s and ETA (a progress bar and TensorBoard events, process 0
    only), saves orbax checkpoints every `train.checkpoint_every` steps and at the end (keeping
    `train.keep_checkpoints`), evaluates every `train.eval_every` steps and at the end;
  * stops on a non-finite loss with a message naming the step; the last good checkpoint stays
    the latest (a checkpoint is written only after its step's loss was checked).
"""

import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from fcos_jax import checkpoint, compile_cache, eval_lib, optim, sharding, train_lib
from fcos_jax import classes as class_lists
from fcos_jax.data import pipeline as data_pipeline
from fcos_jax.data import sources as data_sources
from fcos_jax.models import build_model

log = logging.getLogger(__name__)
PyTree = Any

TRAIN_INPUTS = ("image", "boxes", "labels", "box_valid")


class NonFiniteLossError(FloatingPointError):
    """The loss of a step was NaN or infinite."""


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


class _MetricWriter:
    """TensorBoard scalars and a text log, written by process 0 only."""

    def __init__(self, workdir: Path, enabled: bool):
        self.enabled = enabled
        self._writer = None
        if enabled:
            import tensorflow as tf  # the metric writer is TF's summary API

            self._tf = tf
            self._writer = tf.summary.create_file_writer(str(workdir / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self._writer:
            return
        with self._writer.as_default(step=step):
            for name, value in values.items():
                self._tf.summary.scalar(name, value)
        self._writer.flush()


class _Progress:
    """A one-line progress bar with loss components, lr, images/s and ETA (process 0)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _format_metrics(metrics: dict[str, float], images_per_s: float) -> str:
    return (
        f"loss {metrics['loss']:.4f} (cls {metrics['loss_cls']:.4f} "
        f"box {metrics['loss_bbox']:.4f} ctr {metrics['loss_centerness']:.4f}) "
        f"pos {metrics['num_pos']:.0f} lr {metrics['lr']:.2e} {images_per_s:.1f} img/s"
    )


def _check_finite(step: int, metrics: dict[str, float], last_checkpoint: int | None) -> None:
    if not all(math.isfinite(metrics[k]) for k in ("loss", "loss_cls", "loss_bbox")):
        kept = (
            f"the last good checkpoint is step {last_checkpoint}"
            if last_checkpoint is not None
            else "no checkpoint was written"
        )
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: {metrics}; training stopped, {kept}"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Trains `config` in `workdir` (module docstring). Returns the final evaluation's stats
    ({} when `train.eval_at_end` is off, and on processes other than 0)."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    compile_cache.enable_from_config(config)
    mesh = sharding.make_mesh()
    t = config.train
    sharding.local_batch_size(int(t.batch_size), mesh)  # validates divisibility
    if int(t.batch_size) % (int(t.accumulate_steps) * mesh.size):
        raise ValueError(
            f"train.batch_size {t.batch_size} must divide into train.accumulate_steps "
            f"{t.accumulate_steps} micro-batches over {mesh.size} devices"
        )
    evaluates = int(t.eval_every) > 0 or bool(t.get("eval_at_end", True))
    data_sources.prepare_splits(
        config, [config.data.train_split] + ([config.data.val_split] if evaluates else [])
    )

    pipeline = data_pipeline.TrainPipeline(
        config, process_index=jax.process_index(), process_count=jax.process_count()
    )
    # model.head.num_classes = 0: as many classes as the training data has.
    config = class_lists.resolve_num_classes(
        config, pipeline.classes, f"data.classes of {pipeline.source}"
    )
    steps_per_epoch = pipeline.steps_per_epoch
    num_steps = optim.total_steps(config, steps_per_epoch)
    model = build_model(config.model)
    canvas = pipeline.canvases[0]
    variables = jax.jit(model.init)(
        jax.random.PRNGKey(int(config.seed)), np.zeros((1, *canvas, 3), np.float32)
    )
    optimizer, schedule = optim.build_optimizer(config, variables["params"], steps_per_epoch)

    meta = checkpoint.make_meta(config, source="fcos_jax train.py", classes=pipeline.classes)
    manager = checkpoint.checkpoint_manager(workdir, max_to_keep=int(t.keep_checkpoints))
    start_step = 0
    restored = None
    if manager.latest_step() is not None:
        restored = _resume(manager, config, variables, optimizer, mesh, pipeline.classes)
    if restored is not None:
        start_step, variables, opt_state, data_state = restored
        pipeline.restore(data_state)
        if lead:
            log.info("resumed %s at step %d", workdir, start_step)
    else:
        if config.init_from:
            loaded, loaded_meta = checkpoint.restore_weights(config.init_from)
            variables, report = merge_init_weights(variables, loaded, config.init_from)
            if lead:
                log.info(
                    "initialised from %s (%s)", config.init_from, loaded_meta.get("source", "?")
                )
                for line in report:
                    log.info("  %s", line)
        opt_state = optimizer.init(variables["params"])
    state = train_lib.TrainState(
        step=np.asarray(start_step, np.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=opt_state,
    )
    state = sharding.replicate(state, mesh)
    step_fn = train_lib.jit_train_step(
        train_lib.make_train_step(config, model, optimizer, schedule), mesh
    )
    evaluate = functools.partial(_evaluate, config, mesh, pipeline.classes)

    writer = _MetricWriter(workdir, enabled=lead)
    progress = _Progress(num_steps, start_step, enabled=lead and bool(t.get("progress_bar", True)))
    log_every = max(int(t.log_every), 1)
    checkpoint_every = int(t.checkpoint_every)
    eval_every = int(t.eval_every)
    predict_step = None
    last_checkpoint = manager.latest_step()
    pending = None  # (step, metrics on device) of the step before the current one
    window_start, window_images = time.perf_counter(), 0
    stats: dict[str, float] = {}

    def read(pending_item) -> dict[str, float]:
        step, device_metrics = pending_item
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        _check_finite(step, metrics, last_checkpoint)
        return metrics

    def report(step: int, metrics: dict[str, float]) -> None:
        nonlocal window_start, window_images
        elapsed = time.perf_counter() - window_start
        rate = window_images / max(elapsed, 1e-9)
        text = _format_metrics(metrics, rate)
        progress.update(step, text)
        writer.scalars(step, dict(metrics, images_per_second=rate))
        if lead and not progress.enabled:
            eta = (num_steps - step) * elapsed / max(window_images, 1) * int(t.batch_size)
            log.info("step %d/%d %s eta %.0fs", step, num_steps, text, eta)
        window_start, window_images = time.perf_counter(), 0

    try:
        for step in range(start_step, num_steps):
            batch = next(pipeline)
            data_state = pipeline.state()
            global_batch = sharding.to_global({k: batch[k] for k in TRAIN_INPUTS}, mesh)
            state, metrics = step_fn(state, global_batch)
            window_images += int(t.batch_size)
            done = step + 1
            if pending is not None:
                previous = read(pending)
                if pending[0] % log_every == 0 or pending[0] == 1:
                    report(pending[0], previous)
            pending = (done, metrics)
            save_now = done == num_steps or (checkpoint_every > 0 and done % checkpoint_every == 0)
            eval_now = eval_every > 0 and done % eval_every == 0 and done != num_steps
            if save_now or eval_now:
                read(pending)  # never checkpoint or evaluate a non-finite state
            if save_now:
                manager.wait_until_finished()
                checkpoint.save(
                    manager,
                    done,
                    state.params,
                    state.batch_stats,
                    meta,
                    opt_state=state.opt_state,
                    data_state=data_state,
                )
                last_checkpoint = done
            if eval_now:
                predict_step = predict_step or eval_lib.make_predict_step(config, mesh)
                stats = evaluate(state, predict_step, writer, done, lead)
        if pending is not None:
            report(pending[0], read(pending))
        manager.wait_until_finished()
    finally:
        progress.close()
        manager.close()
    if t.get("eval_at_end", True):
        predict_step = predict_step or eval_lib.make_predict_step(config, mesh)
        stats = evaluate(state, predict_step, writer, num_steps, lead)
    return stats


def _evaluate(config, mesh, classes, state, predict_step, writer, step, lead) -> dict[str, float]:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    stats, report = eval_lib.evaluate(
        config, variables, mesh, classes=classes, predict_step=predict_step
    )
    if lead:
        print(f"evaluation at step {step}:\n{report}", flush=True)
        writer.scalars(step, {f"eval/{k}": v for k, v in stats.items()})
    return stats


def _resume(manager, config, variables, optimizer, mesh, classes):
    """(step, variables, opt_state, data_state) of the workdir's latest checkpoint, restored onto
    this run's mesh (replicated), whatever process and device count wrote it."""
    step_dir = Path(manager.directory) / str(manager.latest_step())
    meta = manager.restore(
        manager.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )["meta"]
    if meta.get("config_name") != config.name:
        raise checkpoint.CheckpointError(
            f"{step_dir}: the workdir holds a checkpoint of config {meta.get('config_name')!r}, "
            f"not {config.name!r}; use another --workdir (or the same config) to go on"
        )
    if "classes" in meta and class_lists.from_meta(meta, str(step_dir)) != list(classes):
        raise checkpoint.CheckpointError(
            f"{step_dir}: the workdir was trained on other classes than the data has now "
            f"({len(meta['classes'])} vs {len(classes)}: channel -> category id, name); use "
            "another --workdir for this data"
        )
    replicated = sharding.replicated(mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        (variables["params"], variables.get("batch_stats", {})),
    )
    abstract_opt = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(optimizer.init, abstract[0]),
    )
    step, items = checkpoint.restore_latest(manager, abstract[0], abstract[1], abstract_opt)
    restored_vars = {"params": items["params"], "batch_stats": items["batch_stats"] or {}}
    return step, restored_vars, items["opt_state"], items["data_state"]
