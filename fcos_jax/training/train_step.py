"""Train state and the jitted, data-parallel FCOS train step.

One step = forward -> targets (pure, vmapped) -> losses -> gradients -> optax update, all in one
`jax.jit` over a global batch sharded on the mesh axis `data`. The gradients are computed per
device (`jax.shard_map`) and all-reduced once per step, after any micro-batch loop. Loss
normalisers are sums over the global batch, so the update does not depend on the device count.
With `train.accumulate_steps = k` the batch is split into k micro-batches and only one
micro-batch's activations and targets are alive at a time: a first pass sums the
normalisers' counts of every micro-batch (targets encoded and dropped), a second sums each
micro-batch's gradients against those whole-batch normalisers, so the update is the one of the
whole batch. BatchNorm trained on batch statistics normalises each micro-batch with its own
statistics (global-batch statistics would need another forward pass), and its running averages
are updated once per step with the mean of the micro-batch statistics.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, PartitionSpec

from fcos_jax.detection import losses, points, targets
from fcos_jax.models import cpu_kernels
from fcos_jax.parallel import sharding
from fcos_jax.training import optim
from fcos_jax.utils import compile_options

PyTree = Any
Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `batch_stats` is empty for frozen-BN backbones' updates."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree


def encode_batch(config: ml_collections.ConfigDict, batch: Batch) -> dict[str, jax.Array]:
    """`targets.encode` vmapped over the batch for the batch's (static) image size."""
    t = config.targets
    levels = len(config.model.head.strides)
    encode = functools.partial(
        targets.encode,
        feature_sizes=points.feature_sizes(batch["image"].shape[1:3], levels),
        strides=tuple(config.model.head.strides),
        regress_ranges=tuple(tuple(r) for r in t.regress_ranges),
        legacy_plus_one=config.legacy_plus_one,
        assigner=t.assigner,
        center_sampling=t.center_sampling,
        center_sample_radius=t.center_sample_radius,
        norm_on_bbox=t.norm_on_bbox,
    )
    return jax.vmap(encode)(batch["boxes"], batch["labels"], batch["box_valid"])


def trains_batch_stats(config: ml_collections.ConfigDict) -> bool:
    """True when the backbone's BatchNorm normalises with batch statistics while training."""
    return config.model.backbone.norm == "batch_stats_bn"


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    image_hw: tuple[int, int],
) -> TrainState:
    """Fresh parameters (model init, docs/modes.md §2.2) and optimizer state at step 0."""
    variables = model.init(rng, jnp.zeros((1, *image_hw, 3), jnp.float32))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
    )


def all_finite(tree: PyTree) -> jax.Array:
    """Scalar bool: no NaN or infinity in any floating-point leaf of `tree` (integer leaves,
    such as optax's step count, cannot hold one)."""
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _loss_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    loss = config.loss
    return dict(
        strides=tuple(config.model.head.strides),
        legacy_plus_one=config.legacy_plus_one,
        bbox_loss=loss.bbox_loss,
        normalizer=loss.normalizer,
        norm_on_bbox=config.targets.norm_on_bbox,
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
    )


def _split_micro_batches(tree: PyTree, k: int) -> PyTree:
    """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ... (interleaved, so
    every device keeps an equal share of each micro-batch)."""

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        return jnp.moveaxis(x, 1, 0)

    return jax.tree.map(split, tree)


def _split_trainable(params: PyTree, labels: PyTree) -> tuple[dict, dict]:
    """({path: leaf} of the trainable parameters, {path: leaf} of the frozen ones)."""
    flat, flat_labels = flatten_dict(params), flatten_dict(labels)
    trainable = {k: v for k, v in flat.items() if flat_labels[k] != optim.FROZEN}
    frozen = {k: v for k, v in flat.items() if flat_labels[k] == optim.FROZEN}
    return trainable, frozen


def make_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    labels: PyTree,
    mesh: Mesh,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted step `(state, batch) -> (state, metrics)` on `mesh`; see `jit_train_step`.

    optimizer, schedule, labels: `optim.build_optimizer`'s; the parameters labelled frozen get
    no gradient.

    batch: image [B,H,W,3] f32, boxes [B,M,4] xyxy px, labels [B,M] int32, box_valid [B,M] bool.
    metrics: loss, loss_cls, loss_bbox, loss_centerness, num_pos (global batch), lr, and
    state_finite (bool: the new state is finite, `all_finite`; the trainer checks it before a
    checkpoint, so the flag costs no host round trip of its own).

    Each device computes the gradients of its shard of the batch (`jax.shard_map` over the mesh
    axis `data`), summed over its micro-batches, and the trainable parameters' gradients are
    all-reduced once, after the loop: one reduction per optimizer step, whatever the
    accumulation, and a weight used several times (the head's, once per pyramid level) is
    reduced once. Only the normalisers' counts and the loss terms (scalars), and with
    `batch_stats_bn` each BatchNorm's statistics, cross devices besides.
    """
    accumulate = int(config.train.accumulate_steps)
    loss_kwargs = _loss_kwargs(config)
    mutable_stats = trains_batch_stats(config)
    if mutable_stats:  # each device normalises with the statistics of the whole (micro-)batch
        model = model.clone(backbone=model.backbone.clone(batch_axis=sharding.DATA_AXIS))

    def loss_fn(trainable, frozen, batch_stats, batch, batch_targets, normalizers):
        variables = {"params": unflatten_dict(trainable | frozen), "batch_stats": batch_stats}
        if mutable_stats:
            outputs, updated = model.apply(
                variables, batch["image"], train=True, mutable=["batch_stats"]
            )
            batch_stats = updated["batch_stats"]
        else:
            outputs = model.apply(variables, batch["image"], train=True)
        terms = losses.fcos_loss(outputs, batch_targets, normalizers=normalizers, **loss_kwargs)
        return terms["loss"], (terms, batch_stats)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def global_normalizers(counts: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return jax.lax.psum(counts, sharding.DATA_AXIS)

    def shard_gradients(trainable, frozen, batch_stats, batch):
        """Per device: its shard's gradients, reduced over the devices once at the end."""
        # Varying per device: their gradients stay local until the one psum below (gradients of
        # replicated inputs would be reduced wherever a weight is used).
        trainable = jax.lax.pcast(trainable, sharding.DATA_AXIS, to="varying")
        if accumulate == 1:
            batch_targets = encode_batch(config, batch)
            normalizers = global_normalizers(losses.batch_normalizers(batch_targets))
            grads, (terms, batch_stats) = grad_fn(
                trainable, frozen, batch_stats, batch, batch_targets, normalizers
            )
        else:
            micro = _split_micro_batches(batch, accumulate)

            # Pass 1: the whole batch's normalisers, summed from each micro-batch's counts (its
            # targets are encoded and dropped: only one micro-batch's targets live at a time).
            def count(total, micro_batch):
                counts = losses.batch_normalizers(encode_batch(config, micro_batch))
                return jax.tree.map(jnp.add, total, counts), None

            zero_counts = {k: jnp.zeros((), jnp.float32) for k in losses.NORMALIZER_TERMS}
            zero_counts = jax.lax.pcast(zero_counts, sharding.DATA_AXIS, to="varying")
            counts, _ = jax.lax.scan(count, zero_counts, micro)
            normalizers = global_normalizers(counts)

            # Pass 2: each micro-batch's gradients against those normalisers, summed on the
            # device. Every micro-batch starts from the step's BN running averages; their mean
            # below is one update with the mean of the micro-batch statistics (not k updates).
            def body(carry, micro_batch):
                grads_sum, terms_sum, stats_sum = carry
                micro_targets = encode_batch(config, micro_batch)
                # The convolution kernel gradients XLA:CPU runs fast inside a loop.
                with cpu_kernels.inside_a_loop():
                    g, (t, stats) = grad_fn(
                        trainable, frozen, batch_stats, micro_batch, micro_targets, normalizers
                    )
                return (
                    jax.tree.map(jnp.add, grads_sum, g),
                    jax.tree.map(jnp.add, terms_sum, t),
                    jax.tree.map(jnp.add, stats_sum, stats),
                ), None

            zero_grads = jax.tree.map(jnp.zeros_like, trainable)
            zero_terms = {k: jnp.zeros((), jnp.float32) for k in losses.LOSS_TERMS}
            zero_terms = jax.lax.pcast(zero_terms, sharding.DATA_AXIS, to="varying")
            zero_stats = jax.tree.map(jnp.zeros_like, batch_stats)
            (grads, terms, stats_sum), _ = jax.lax.scan(
                body, (zero_grads, zero_terms, zero_stats), micro
            )
            if mutable_stats:
                batch_stats = jax.tree.map(lambda x: x / accumulate, stats_sum)
        # The step's one gradient reduction; the loss terms are sums of per-device parts too.
        grads, terms = jax.lax.psum((grads, terms), sharding.DATA_AXIS)
        return grads, dict(terms, num_pos=normalizers["num_pos"]), batch_stats

    replicated, shard = PartitionSpec(), PartitionSpec(sharding.DATA_AXIS)
    sharded_gradients = jax.shard_map(
        shard_gradients,
        mesh=mesh,
        in_specs=(replicated, replicated, replicated, shard),
        out_specs=replicated,
    )

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        trainable, frozen = _split_trainable(state.params, labels)
        grads, terms, batch_stats = sharded_gradients(trainable, frozen, state.batch_stats, batch)
        # Frozen parameters get no gradient (and no update: their optimizer group is zero).
        grads = unflatten_dict(grads | jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: terms[k] for k in losses.LOSS_TERMS}
        metrics["lr"] = schedule(state.step)
        new_state = TrainState(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        # The loss above was computed before this update: only the new state tells whether
        # the update blew up, and only a finite state may be checkpointed.
        metrics["state_finite"] = all_finite((params, batch_stats, opt_state))
        return new_state, metrics

    return step


def jit_train_step(step: Callable, mesh: Mesh) -> Callable:
    """jit with the state replicated and the batch sharded on `data`; the old state is donated.

    Place the first state with `sharding.replicate(state, mesh)`: arrays not yet on the mesh are a
    different input type and would compile the step a second time.
    """
    return jax.jit(
        step,
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
        donate_argnums=(0,),
        compiler_options=compile_options.compiler_options(),
    )
