"""SGD or AdamW with mmdetection's parameter groups, the mmcv step schedule, warmup and clipping.

The update equals `torch.optim.SGD(momentum, weight_decay, dampening=0, nesterov=False)` with
mmdet v1's parameter groups (docs/modes.md §2.10), driven by mmcv 0.2.x's `StepLrUpdaterHook`:

    g = clip(g_raw)              # optional; torch `clip_grad_norm_` over trainable leaves only
    d = g + wd_group * p
    buf = momentum * buf + d     # buf starts at 0, so the first step gives buf = d as in torch
    p = p - lr(step) * lr_mult_group * buf

The learning rate multiplies the whole momentum buffer after accumulation, as torch does (and as
`optax.sgd` does): a change of lr rescales the step of the entire buffer at once.

`optim.optimizer = 'adamw'` swaps SGD for `torch.optim.AdamW` (decoupled weight decay, betas
`adam_betas`, eps `adam_eps` added to the bias-corrected sqrt(v)) with the same groups, lr
multipliers, schedule and clipping: p = p - lr * (m_hat / (sqrt(v_hat) + eps) + wd_group * p).

Groups (labels from `param_labels`):
  frozen   no update, no optimizer state (stem and the first `frozen_stages` stages; every backbone
           BN affine when `norm_trainable` is False).
  norm     BN/GN scale and bias: base lr, weight decay x norm_decay_mult.
  bias     other biases: lr x bias_lr_mult, weight decay x bias_decay_mult.
  default  everything else, including the head's `scales_l/scale`: base lr and weight decay.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

FROZEN = "frozen"
NORM = "norm"
BIAS = "bias"
DEFAULT = "default"
LABELS = (FROZEN, NORM, BIAS, DEFAULT)

# Modules whose `scale`/`bias` are normalisation affines (preamble names: bn1..bn3, the stem bn1,
# downsample_bn in the backbone; gn in the head towers).
_NORM_MODULE = re.compile(r"^(bn\d*|gn|downsample_bn)$")
# Flax's automatic names: a norm layer named this way would silently fall into the wrong group.
_AUTO_NORM_NAME = re.compile(r"^(BatchNorm|GroupNorm|LayerNorm|FrozenBatchNorm)_\d+$")
_STAGE_MODULE = re.compile(r"^layer(\d+)_\d+$")
_STEM_MODULES = ("conv1", "bn1")
_WARMUPS = ("constant", "linear", "torchvision", "none")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULE_UNITS = ("epochs", "steps")
# torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6).
_TORCH_CLIP_EPS = 1e-6


def _path_names(path: tuple[Any, ...]) -> list[str]:
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        else:
            names.append(str(getattr(key, "idx", key)))
    if names and names[0] == "params":  # accept the whole variables['params'] collection too
        names = names[1:]
    return names


def _label_for(names: list[str], config: ml_collections.ConfigDict) -> str:
    path = "/".join(names)
    leaf = names[-1]
    module = names[-2] if len(names) >= 2 else ""
    if any(_AUTO_NORM_NAME.match(n) for n in names):
        raise ValueError(f"param '{path}': auto-named norm layer; name it bn*/gn/downsample_bn")
    is_norm = leaf in ("scale", "bias") and _NORM_MODULE.match(module) is not None

    backbone = config.model.backbone
    if names[0] == "backbone" and len(names) >= 3:
        frozen_stages = int(backbone.frozen_stages)
        # mmdet ResNet._freeze_stages: frozen_stages >= 0 freezes conv1 and bn1, and stages
        # 1..frozen_stages freeze layer1..layer{frozen_stages}; -1 freezes nothing.
        if names[1] in _STEM_MODULES and frozen_stages >= 0:
            return FROZEN
        stage = _STAGE_MODULE.match(names[1])
        if stage is not None and int(stage.group(1)) <= frozen_stages:
            return FROZEN
        if is_norm and not backbone.norm_trainable:
            return FROZEN

    if is_norm:
        if module == "downsample_bn" and config.optim.downsample_bn_bias_as_bias:
            # mmdet v1 regex `(bn|gn)(\d+)?.(weight|bias)` misses `downsample.1.*`: its bias
            # falls in the bias group and its weight in the default group (docs/modes.md §2.10).
            return BIAS if leaf == "bias" else DEFAULT
        return NORM
    if leaf == "bias":
        return BIAS
    return DEFAULT


def _check_config(config: ml_collections.ConfigDict) -> None:
    train, optim = config.train, config.optim
    frozen_stages = config.model.backbone.frozen_stages
    if not -1 <= int(frozen_stages) <= 4:
        raise ValueError(
            f"config.model.backbone.frozen_stages must be in -1..4, got {frozen_stages}"
        )
    if _warmup_kind(optim) != "none":
        if int(optim.warmup_iters) <= 0:
            raise ValueError(f"config.optim.warmup_iters must be > 0, got {optim.warmup_iters}")
        if not 0.0 < float(optim.warmup_ratio) <= 1.0:
            raise ValueError(
                f"config.optim.warmup_ratio must be in (0, 1], got {optim.warmup_ratio}"
            )
    unit = schedule_unit(train)
    steps = list(optim.lr_steps)
    if any(int(s) <= 0 for s in steps) or steps != sorted(steps):
        raise ValueError(f"config.optim.lr_steps must be increasing positive {unit}, got {steps}")
    if int(optim.reference_batch) <= 0 or int(train.batch_size) <= 0:
        raise ValueError("config.train.batch_size and config.optim.reference_batch must be > 0")
    if optim.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"config.optim.optimizer must be one of {OPTIMIZERS}, got {optim.optimizer!r}"
        )
    if float(optim.grad_clip_norm) < 0:
        raise ValueError(f"config.optim.grad_clip_norm must be >= 0, got {optim.grad_clip_norm}")


def schedule_unit(train: ml_collections.ConfigDict) -> str:
    """'epochs' or 'steps': the unit of the run length and of `optim.lr_steps`
    (`train.schedule_unit`).

    epochs: the run is `train.epochs` epochs of the dataset at hand and `lr_steps` are epochs
    (the model-zoo recipes); steps: the run is `train.num_steps` optimizer steps and `lr_steps`
    are steps, whatever the dataset's size. Mixing the two is refused, so a decay point never
    moves with the dataset's size by accident.
    """
    unit = train.get("schedule_unit", "epochs")
    if unit not in SCHEDULE_UNITS:
        raise ValueError(
            f"config.train.schedule_unit must be one of {SCHEDULE_UNITS}, got {unit!r}"
        )
    length = {"epochs": "epochs", "steps": "num_steps"}[unit]
    other = {"epochs": "num_steps", "steps": "epochs"}[unit]
    if int(train.get(length, 0) or 0) <= 0:
        raise ValueError(
            f"config.train.{length} must be > 0 with schedule_unit={unit!r}, "
            f"got {train.get(length)}"
        )
    if int(train.get(other, 0) or 0) > 0:
        flip = "steps" if unit == "epochs" else "epochs"
        raise ValueError(
            f"config.train.{other}={train.get(other)} but schedule_unit={unit!r}: the run length "
            f"is config.train.{length} and config.optim.lr_steps are {unit}; set "
            f"config.train.{other}=0, or schedule_unit={flip!r} with config.train.{length}=0 and "
            f"config.optim.lr_steps in {flip}"
        )
    return unit


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: `train.num_steps`, or `train.epochs` whole epochs."""
    train = config.train
    if schedule_unit(train) == "steps":
        return int(train.num_steps)
    return int(train.epochs) * steps_per_epoch


def decay_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
    """Optimizer steps at which the learning rate drops x0.1 (`optim.lr_steps` in its unit)."""
    scale = steps_per_epoch if schedule_unit(config.train) == "epochs" else 1
    return [int(s) * scale for s in config.optim.lr_steps]


def _warmup_kind(optim: ml_collections.ConfigDict) -> str:
    kind = "none" if optim.warmup in (None, "") else str(optim.warmup)
    if kind not in _WARMUPS:
        raise ValueError(f"config.optim.warmup must be one of {_WARMUPS}, got {optim.warmup!r}")
    return kind


def param_labels(params: Mapping[str, Any], config: ml_collections.ConfigDict) -> Any:
    """Optimizer group of every parameter: a pytree shaped like `params` with str leaves.

    params: the Flax `params` collection (or `{'params': ...}`), names as in the preamble
    (`backbone/layer2_0/downsample_bn/bias`, `bbox_head/cls_convs_0/gn/scale`, ...).
    Returns labels from LABELS: 'frozen', 'norm', 'bias' or 'default'.
    """
    _check_config(config)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _label_for(_path_names(path), config), params
    )


def learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """Learning rate of optimizer step `count` (0-based global iteration), for the base group.

    lr = base_lr * batch_size / reference_batch, x0.1 from each of `decay_steps` (mmcv `step`
    policy: epoch e of lr_steps starts at iteration e * steps_per_epoch, epochs 0-based; or the
    steps themselves with schedule_unit 'steps'), and during iterations 0..warmup_iters-1 the
    mmcv warmup of that regular lr. Group multipliers are applied elsewhere.
    """
    _check_config(config)
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be > 0, got {steps_per_epoch}")
    train, optim = config.train, config.optim
    warmup = _warmup_kind(optim)
    scaled_lr = float(optim.base_lr) * int(train.batch_size) / int(optim.reference_batch)
    boundaries = jnp.asarray(decay_steps(config, steps_per_epoch), jnp.int32)
    # regular lr after k decays, computed in float64 on the host as mmcv does: base * gamma**k.
    regular_table = jnp.asarray(
        [scaled_lr * 0.1**k for k in range(len(optim.lr_steps) + 1)], jnp.float32
    )
    warmup_iters = int(optim.warmup_iters)
    if warmup == "torchvision":
        # torchvision references/detection `train_one_epoch`: in epoch 0 only, LinearLR from
        # start_factor = warmup_ratio over min(warmup_iters, len(data_loader) - 1) iterations.
        warmup_iters = min(warmup_iters, steps_per_epoch - 1)
        if warmup_iters <= 0:
            warmup = "none"
    ratio = float(optim.warmup_ratio)

    def schedule(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count, jnp.int32)
        num_decays = jnp.sum(count >= boundaries)
        regular = regular_table[num_decays]
        if warmup == "none":
            return regular
        # mmcv LrUpdaterHook.get_warmup_lr (open-mmlab/mmcv@a0cba4f, the v0.2.x
        # mmcv/runner/hooks/lr_updater.py, `from __future__ import division`):
        #   constant: warmup_lr = regular_lr * warmup_ratio
        #   linear:   k = (1 - cur_iters / warmup_iters) * (1 - warmup_ratio)
        #             warmup_lr = regular_lr * (1 - k)
        # used while cur_iter < warmup_iters; regular_lr is that epoch's step-policy lr.
        # torch's LinearLR (torchvision) is the same line: start + (1 - start) * i / total.
        if warmup == "constant":
            factor = jnp.float32(ratio)
        else:
            progress = count.astype(jnp.float32) / jnp.float32(warmup_iters)
            # 1 - (1 - p)(1 - r) == r + p(1 - r); this form avoids float32 cancellation for small r.
            factor = jnp.float32(ratio) + progress * jnp.float32(1.0 - ratio)
        return jnp.where(count < warmup_iters, regular * factor, regular)

    return schedule


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """Scale all updates by min(1, max_norm / (global_l2_norm + 1e-6)), as torch's clip_grad_norm_.

    Differs from `optax.clip_by_global_norm` by the 1e-6 and by always multiplying.
    """

    def update_fn(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        total = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
        coef = jnp.minimum(jnp.float32(max_norm) / (total + _TORCH_CLIP_EPS), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _torch_group(
    optim: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    lr_mult: float,
    weight_decay: float,
) -> optax.GradientTransformation:
    """One parameter group of torch.optim.SGD (momentum, coupled decay) or torch.optim.AdamW."""

    def learning_rate(count: jax.Array) -> jax.Array:
        return schedule(count) * lr_mult

    if optim.optimizer == "adamw":
        b1, b2 = (float(b) for b in optim.adam_betas)
        return optax.adamw(
            learning_rate, b1=b1, b2=b2, eps=float(optim.adam_eps), weight_decay=weight_decay
        )
    steps = []
    if weight_decay:
        steps.append(optax.add_decayed_weights(weight_decay))
    steps.append(optax.trace(decay=float(optim.momentum), nesterov=False))
    steps.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*steps)


def build_optimizer(
    config: ml_collections.ConfigDict, params: Mapping[str, Any], steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule, Any]:
    """(the training optimizer, its learning-rate schedule, the parameter labels it partitions
    by): the train step takes the schedule for its `lr` metric and the labels to leave the
    frozen parameters out of its gradients.

    The optimizer is [clip] -> per-group SGD (weight decay -> momentum -> -lr) or AdamW.
    params: the `params` collection (only its tree structure and names are used).
    steps_per_epoch: optimizer steps per epoch (after any gradient accumulation).
    Frozen leaves get exactly zero updates and hold no optimizer state.
    """
    labels = param_labels(params, config)
    schedule = learning_rate_schedule(config, steps_per_epoch)
    optim = config.optim
    wd = float(optim.weight_decay)
    groups = {
        DEFAULT: _torch_group(optim, schedule, 1.0, wd),
        NORM: _torch_group(optim, schedule, 1.0, wd * float(optim.norm_decay_mult)),
        BIAS: _torch_group(
            optim, schedule, float(optim.bias_lr_mult), wd * float(optim.bias_decay_mult)
        ),
        FROZEN: optax.set_to_zero(),
    }
    tx = optax.partition(groups, labels)
    if float(optim.grad_clip_norm) > 0:
        # mmcv OptimizerHook clips the raw grads of the trainable parameters, then steps.
        trainable = jax.tree.map(lambda label: label != FROZEN, labels)
        clip = optax.masked(clip_by_global_norm_torch(float(optim.grad_clip_norm)), trainable)
        tx = optax.chain(clip, tx)
    return tx, schedule, labels
