"""training/optim.py against torch.optim.SGD / AdamW param groups driven by a plain-Python mmcv
schedule."""

import jax
import numpy as np
import optax
import pytest
import torch

from fcos_jax.config import base as config_base
from fcos_jax.training import optim

# Leaf path -> (shape, label for the caffe R-50 setting, label for X-101 with the v1 quirk).
# The labels are written by hand from docs/modes.md §2.2 and §2.10, independently of
# optim.param_labels.
PARAMS = {
    "backbone/conv1/kernel": ((3, 3, 3, 4), "frozen", "frozen"),
    "backbone/bn1/scale": ((4,), "frozen", "frozen"),
    "backbone/bn1/bias": ((4,), "frozen", "frozen"),
    "backbone/layer1_0/conv1/kernel": ((1, 1, 4, 4), "frozen", "frozen"),
    "backbone/layer1_0/bn1/scale": ((4,), "frozen", "frozen"),
    "backbone/layer1_0/bn1/bias": ((4,), "frozen", "frozen"),
    "backbone/layer2_0/conv1/kernel": ((1, 1, 4, 6), "default", "default"),
    "backbone/layer2_0/bn1/scale": ((6,), "frozen", "norm"),
    "backbone/layer2_0/bn1/bias": ((6,), "frozen", "norm"),
    "backbone/layer2_0/downsample_conv/kernel": ((1, 1, 4, 6), "default", "default"),
    "backbone/layer2_0/downsample_bn/scale": ((6,), "frozen", "default"),
    "backbone/layer2_0/downsample_bn/bias": ((6,), "frozen", "bias"),
    "neck/lateral_convs_0/kernel": ((1, 1, 6, 5), "default", "default"),
    "neck/lateral_convs_0/bias": ((5,), "bias", "bias"),
    "bbox_head/cls_convs_0/conv/kernel": ((3, 3, 5, 4), "default", "default"),
    "bbox_head/cls_convs_0/gn/scale": ((4,), "norm", "norm"),
    "bbox_head/cls_convs_0/gn/bias": ((4,), "norm", "norm"),
    "bbox_head/conv_cls/kernel": ((3, 3, 4, 3), "default", "default"),
    "bbox_head/conv_cls/bias": ((3,), "bias", "bias"),
    "bbox_head/scales_0/scale": ((), "default", "default"),
}
CAFFE, X101_QUIRK = 1, 2


def nest(flat):
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        out.update(flatten(value, path) if isinstance(value, dict) else {path: value})
    return out


def make_config(setting, warmup="constant", clip=0.0):
    config = config_base.get_base_config()
    train, opt = config.train, config.optim
    opt.base_lr, train.batch_size, opt.reference_batch = 0.01, 8, 16
    opt.weight_decay, opt.norm_decay_mult = 1e-3, 0.5  # large enough to be seen in 30 steps
    opt.warmup, opt.warmup_iters, opt.warmup_ratio = warmup, 10, 1.0 / 3
    opt.lr_steps, train.epochs = (3, 5), 6
    opt.grad_clip_norm = clip
    config.model.backbone.frozen_stages = 1
    config.model.backbone.norm_trainable = setting == X101_QUIRK
    opt.downsample_bn_bias_as_bias = setting == X101_QUIRK
    return config


def mmcv_lrs(base_lrs, num_iters, steps_per_epoch, lr_steps, warmup, warmup_iters, ratio):
    """Per-iteration group lrs, simulating mmcv 0.2.x StepLrUpdaterHook(by_epoch=True) hooks."""
    lrs, regular, group_lrs = [], None, list(base_lrs)
    for it in range(num_iters):
        epoch = it // steps_per_epoch
        if it % steps_per_epoch == 0:  # before_train_epoch
            decays = sum(1 for s in lr_steps if epoch >= s)
            regular = [lr * 0.1**decays for lr in base_lrs]
            group_lrs = list(regular)
        if warmup is not None and it < warmup_iters:  # before_train_iter
            if warmup == "constant":
                group_lrs = [lr * ratio for lr in regular]
            else:
                k = (1 - it / warmup_iters) * (1 - ratio)
                group_lrs = [lr * (1 - k) for lr in regular]
        elif warmup is not None and it == warmup_iters:
            group_lrs = list(regular)
        lrs.append(list(group_lrs))
    return lrs


def test_schedule_hand_values_constant_warmup_and_steps():
    config = config_base.get_base_config()  # lr 0.01 @ 16, constant 500 x 1/3, steps (8, 11)
    lr = optim.learning_rate_schedule(config, steps_per_epoch=100)
    expected = {0: 0.01 / 3, 499: 0.01 / 3, 500: 0.01, 799: 0.01, 800: 1e-3, 1099: 1e-3, 1100: 1e-4}
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6, err_msg=f"step {step}")


def test_schedule_hand_values_linear_warmup():
    config = config_base.get_base_config()
    config.optim.warmup, config.optim.warmup_ratio = "linear", 0.001
    lr = optim.learning_rate_schedule(config, steps_per_epoch=1000)
    # 0.01 * (1 - (1 - i/500) * 0.999)
    expected = {0: 1e-5, 250: 0.005005, 499: 0.01 * (1 - 0.002 * 0.999), 500: 0.01}
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6, err_msg=f"step {step}")


def test_warmup_spanning_a_decay_uses_that_epochs_regular_lr():
    config = make_config(CAFFE)
    config.optim.warmup_iters, config.optim.lr_steps = 20, (1,)
    lr = optim.learning_rate_schedule(config, steps_per_epoch=5)
    np.testing.assert_allclose(float(lr(4)), 0.005 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(5)), 0.0005 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(20)), 0.0005, rtol=1e-6)


def test_lr_scales_linearly_with_batch_size():
    config = config_base.get_base_config()
    config.optim.warmup = "none"
    for batch, expected in [(16, 0.01), (8, 0.005), (2, 0.00125), (32, 0.02)]:
        config.train.batch_size = batch
        lr = optim.learning_rate_schedule(config, steps_per_epoch=10)
        np.testing.assert_allclose(float(lr(0)), expected, rtol=1e-6, err_msg=f"batch {batch}")


@pytest.mark.parametrize("setting", [CAFFE, X101_QUIRK])
def test_labels_follow_mmdet_v1_groups(setting):
    params = nest({path: np.zeros(shape, np.float32) for path, (shape, *_) in PARAMS.items()})
    labels = flatten(optim.param_labels(params, make_config(setting)))
    assert labels == {path: entry[setting] for path, entry in PARAMS.items()}


def test_downsample_bn_is_a_norm_without_the_quirk():
    config = make_config(X101_QUIRK)
    config.optim.downsample_bn_bias_as_bias = False
    params = nest({path: np.zeros(shape, np.float32) for path, (shape, *_) in PARAMS.items()})
    labels = flatten(optim.param_labels(params, config))
    assert labels["backbone/layer2_0/downsample_bn/bias"] == "norm"
    assert labels["backbone/layer2_0/downsample_bn/scale"] == "norm"


@pytest.mark.parametrize("frozen_stages", [-1, 0, 2])
def test_frozen_stages_follow_mmdet_freeze_stages(frozen_stages):
    config = make_config(X101_QUIRK)
    config.model.backbone.frozen_stages = frozen_stages
    params = nest({path: np.zeros(shape, np.float32) for path, (shape, *_) in PARAMS.items()})
    labels = flatten(optim.param_labels(params, config))
    assert (labels["backbone/conv1/kernel"] == "frozen") == (frozen_stages >= 0)
    assert (labels["backbone/bn1/scale"] == "frozen") == (frozen_stages >= 0)
    assert (labels["backbone/layer1_0/conv1/kernel"] == "frozen") == (frozen_stages >= 1)
    assert (labels["backbone/layer2_0/conv1/kernel"] == "frozen") == (frozen_stages >= 2)


def test_bad_config_and_auto_named_norm_raise_naming_the_field():
    config = make_config(CAFFE, warmup="cosine")
    with pytest.raises(ValueError, match="config.optim.warmup"):
        optim.learning_rate_schedule(config, 10)
    with pytest.raises(ValueError, match="GroupNorm_0"):
        optim.param_labels({"bbox_head": {"GroupNorm_0": {"scale": 0.0}}}, make_config(CAFFE))


CLIP = 10.0  # trainable grad norms below are about 6, 29 and 53 in turn: some steps clip


@pytest.mark.parametrize(
    "warmup,clip,setting,optimizer",
    [
        ("constant", 0.0, CAFFE, "sgd"),
        ("linear", 0.0, X101_QUIRK, "sgd"),
        ("constant", CLIP, X101_QUIRK, "sgd"),
        ("linear", CLIP, CAFFE, "sgd"),
        ("linear", 0.0, X101_QUIRK, "adamw"),
        ("constant", CLIP, CAFFE, "adamw"),
    ],
)
def test_thirty_steps_match_torch_param_groups(warmup, clip, setting, optimizer):
    num_steps, steps_per_epoch = 30, 5
    rng = np.random.default_rng(7)
    init = {}
    for path, (shape, *_) in PARAMS.items():  # magnitudes in [0.5, 1.5) keep rtol meaningful
        magnitude = rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        init[path] = np.asarray(magnitude, np.float32)
    grads = []
    for step in range(num_steps):
        gain = 0.3 + 1.2 * (step % 3)
        grads.append(
            {p: (gain * rng.standard_normal(v.shape)).astype(np.float32) for p, v in init.items()}
        )

    # torch reference: groups from the hand-written labels, lrs from the mmcv simulation.
    wd, bias_lr_mult, bias_decay_mult, norm_decay_mult = 1e-3, 2.0, 0.0, 0.5
    tensors = {p: torch.tensor(v, requires_grad=True) for p, v in init.items()}
    group_of = {p: entry[setting] for p, entry in PARAMS.items()}
    group_defs = {
        "default": (1.0, wd),
        "norm": (1.0, wd * norm_decay_mult),
        "bias": (bias_lr_mult, wd * bias_decay_mult),
    }
    names = [g for g in group_defs if any(label == g for label in group_of.values())]
    torch_groups = [
        {
            "params": [tensors[p] for p in PARAMS if group_of[p] == g],
            "lr": 0.0,
            "weight_decay": group_defs[g][1],
        }
        for g in names
    ]
    if optimizer == "sgd":
        reference = torch.optim.SGD(
            torch_groups, lr=0.0, momentum=0.9, dampening=0.0, nesterov=False
        )
    else:
        reference = torch.optim.AdamW(torch_groups, lr=0.0, betas=(0.8, 0.99), eps=1e-6)
    base_lrs = [0.005 * group_defs[g][0] for g in names]  # 0.01 x 8 / 16
    lrs = mmcv_lrs(base_lrs, num_steps, steps_per_epoch, (3, 5), warmup, 10, 1.0 / 3)
    trainable = [tensors[p] for p in PARAMS if group_of[p] != "frozen"]
    clipped_steps = 0
    for step in range(num_steps):
        for path, tensor in tensors.items():
            tensor.grad = torch.tensor(grads[step][path]) if group_of[path] != "frozen" else None
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(trainable, clip)
            clipped_steps += int(norm > clip)
        for group, lr in zip(reference.param_groups, lrs[step], strict=True):
            group["lr"] = lr
        reference.step()

    # ours: every grad given, frozen ones included (they must be ignored, also by the clip norm).
    config = make_config(setting, warmup, clip)
    config.optim.optimizer, config.optim.adam_betas, config.optim.adam_eps = (
        optimizer,
        (0.8, 0.99),
        1e-6,
    )
    params = nest({p: jax.numpy.asarray(v) for p, v in init.items()})
    tx, _, _ = optim.build_optimizer(config, params, steps_per_epoch)
    state = tx.init(params)

    @jax.jit
    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for step in range(num_steps):
        params, state = update(params, state, nest(grads[step]))

    ours = flatten(params)
    # float32 rounding: AdamW's bias corrections and sqrt are ordered differently in torch and
    # optax (one element in ~200 differs by 1.1e-6 relative after 30 steps).
    rtol = 1e-6 if optimizer == "sgd" else 3e-6
    for path in PARAMS:
        if group_of[path] == "frozen":
            assert np.array_equal(np.asarray(ours[path]), init[path]), path
        else:
            expected = tensors[path].detach().numpy()
            np.testing.assert_allclose(np.asarray(ours[path]), expected, rtol=rtol, err_msg=path)
            assert not np.allclose(expected, init[path]), path  # it did train
    if clip:
        assert 0 < clipped_steps < num_steps
    # frozen leaves hold no momentum buffer (SGD) / no moments (AdamW)
    kind = optax.TraceState if optimizer == "sgd" else optax.ScaleByAdamState
    buffers = [
        s.trace if optimizer == "sgd" else s.mu
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
        if isinstance(s, kind)
    ]
    buffered = sum(x.size for b in buffers for x in jax.tree.leaves(b))
    assert buffered == sum(
        int(np.prod(shape)) for shape, *_ in (PARAMS[p] for p in PARAMS if group_of[p] != "frozen")
    )


def test_clip_matches_torch_clip_grad_norm_including_its_epsilon():
    rng = np.random.default_rng(3)
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal((5,))}
    grads = {k: (v * 1e-6).astype(np.float32) for k, v in grads.items()}  # norm ~ 4e-6
    max_norm = 1e-6  # here the 1e-6 in torch's denominator changes the factor by ~20%
    tensors = [torch.tensor(v, requires_grad=True) for v in grads.values()]
    for tensor, value in zip(tensors, grads.values(), strict=True):
        tensor.grad = torch.tensor(value)
    torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    tx = optim.clip_by_global_norm_torch(max_norm)
    clipped, _ = tx.update(grads, tx.init(grads))
    for tensor, key in zip(tensors, grads, strict=True):
        np.testing.assert_allclose(np.asarray(clipped[key]), tensor.grad.numpy(), rtol=1e-6)


def test_torchvision_row_trains_like_torchvisions_reference_recipe():
    """configs/torchvision_fcos_r50_fpn.py against torchvision's references/detection loop:
    SGD(momentum 0.9, weight decay 1e-4 on every trainable tensor) over exactly the parameters
    torchvision trains (requires_grad), MultiStepLR per epoch and a LinearLR warm-up of
    min(1000, len(data_loader) - 1) iterations in epoch 0; 3 epochs of 4 steps, decays after 1, 2.
    """
    from fcos_jax.compare.torchvision_random import pretrained_layout_fcos
    from fcos_jax.config import load_config
    from fcos_jax.convert import core as convert_core

    steps_per_epoch, epochs = 4, 3
    config = load_config("configs/torchvision_fcos_r50_fpn.py")
    config.train.epochs, config.optim.lr_steps = epochs, (1, 2)
    model = pretrained_layout_fcos(seed=3)
    state_dict = model.state_dict()
    names = list(state_dict)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    # Which torch tensor each of our leaves holds: tag every tensor with its index, convert.
    tags = {
        k: np.full(tuple(v.shape), i, np.float32) for i, (k, v) in enumerate(state_dict.items())
    }
    tagged = flatten(convert_core.convert_state_dict(tags, "torchvision", config).params)
    source = {path: names[int(np.asarray(leaf).flat[0])] for path, leaf in tagged.items()}
    labels = flatten(optim.param_labels(nest(tagged), config))
    assert {source[p] for p in tagged if labels[p] != "frozen"} == trainable

    # SGD over a slice of the model with every group in it (stem, a frozen and a trained stage,
    # FPN, head convs, GroupNorm, biases): each leaf's update depends on its own gradient only.
    prefixes = (
        "backbone/conv1",
        "backbone/bn1",
        "backbone/layer1_0/",
        "backbone/layer2_0/",
        "neck/lateral_convs_0/",
        "bbox_head/cls_convs_0/",
        "bbox_head/conv_cls/",
    )
    paths = [p for p in tagged if p.startswith(prefixes)]
    to_ours = lambda a: np.transpose(a, (2, 3, 1, 0)) if a.ndim == 4 else a  # noqa: E731
    initial = {p: to_ours(state_dict[source[p]].numpy()).copy() for p in paths}
    params = {source[p]: model.get_parameter(source[p]) for p in paths if source[p] in trainable}
    rng = np.random.default_rng(0)
    grads = [
        {n: rng.standard_normal(tuple(t.shape)).astype(np.float32) for n, t in params.items()}
        for _ in range(steps_per_epoch * epochs)
    ]

    reference = torch.optim.SGD(list(params.values()), lr=0.01, momentum=0.9, weight_decay=1e-4)
    decay = torch.optim.lr_scheduler.MultiStepLR(reference, milestones=[1, 2], gamma=0.1)
    step = 0
    for epoch in range(epochs):
        warmup = None
        if epoch == 0:
            warmup = torch.optim.lr_scheduler.LinearLR(
                reference, start_factor=1.0 / 1000, total_iters=min(1000, steps_per_epoch - 1)
            )
        for _ in range(steps_per_epoch):
            for name, param in params.items():
                param.grad = torch.from_numpy(grads[step][name])
            reference.step()
            if warmup is not None:
                warmup.step()
            step += 1
        decay.step()

    ours = nest({p: jax.numpy.asarray(v) for p, v in initial.items()})
    tx, _, _ = optim.build_optimizer(config, ours, steps_per_epoch)
    opt_state = tx.init(ours)

    @jax.jit
    def update(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    zero = {p: np.zeros_like(v) for p, v in initial.items()}
    for g in grads:
        ours, opt_state = update(
            ours,
            opt_state,
            nest({**zero, **{p: to_ours(g[source[p]]) for p in paths if source[p] in g}}),
        )
    for path, value in flatten(ours).items():
        if labels[path] == "frozen":
            assert np.array_equal(np.asarray(value), initial[path]), path
        else:
            expected = to_ours(params[source[path]].detach().numpy())
            np.testing.assert_allclose(
                np.asarray(value), expected, rtol=1e-5, atol=1e-7, err_msg=path
            )
            assert not np.allclose(expected, initial[path]), path


def test_steps_unit_places_decays_at_steps_whatever_the_epoch_length():
    config = config_base.get_base_config()  # lr 0.01 @ 16 images
    train, opt = config.train, config.optim
    train.schedule_unit, train.epochs, train.num_steps = "steps", 0, 100
    opt.lr_steps, opt.warmup = (60, 90), "none"
    for steps_per_epoch in (7, 50):
        lr = optim.learning_rate_schedule(config, steps_per_epoch)
        got = [float(lr(s)) for s in (0, 59, 60, 89, 90, 99)]
        np.testing.assert_allclose(got, [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4], rtol=1e-6)
        assert optim.total_steps(config, steps_per_epoch) == 100


def test_a_run_length_in_the_other_unit_is_refused_naming_the_fields():
    config = config_base.get_base_config()  # schedule_unit epochs, epochs 12, lr_steps (8, 11)
    config.train.num_steps = 800
    with pytest.raises(ValueError, match="num_steps=800 but schedule_unit='epochs'"):
        optim.total_steps(config, 100)
    config.train.schedule_unit = "steps"
    with pytest.raises(ValueError, match="epochs=12 but schedule_unit='steps'"):
        optim.learning_rate_schedule(config, 100)
    config.train.epochs, config.train.num_steps = 0, 0
    with pytest.raises(ValueError, match="num_steps must be > 0"):
        optim.total_steps(config, 100)
    config.train.schedule_unit = "iterations"
    with pytest.raises(ValueError, match="schedule_unit must be one of"):
        optim.total_steps(config, 100)
