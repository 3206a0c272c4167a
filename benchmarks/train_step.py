"""Train-step speed on CPU: our FCOS train step (JAX, one jit) against torchvision's.

  .venv/bin/python benchmarks/train_step.py [--config configs/fcos_r50_caffe_fpn_gn_1x.py]
      [--steps 5] [--warmup 2] [--rounds 1] [--height 800] [--width 1344] [--batch 2]
      [--profile DIR]   (per-operation table of both sides: benchmarks/op_profile.py)

One step = forward, loss, backward and an SGD update (momentum 0.9, weight decay 1e-4) on a global
batch of 2 images of 800x1344 with 8 random boxes each (padded to the config's max_boxes, 100, on
our side, as training pads them). Both models start from their own random initialisation; only
speed is compared, not values.

  ours         `train_step.make_train_step` of `--config` (default the mmdet v1 R-50 caffe GN row:
               stem and stage 1 frozen, frozen BN, 80 classes), jitted on a 1-device mesh: target
               encoding, losses, gradients and the update in one program.
  torchvision  `FCOS` as `fcos_resnet50_fpn` builds it with pretrained weights (docs/modes.md §4.2):
               `resnet50(norm_layer=FrozenBatchNorm2d)`, `_resnet_fpn_extractor(...,
               trainable_layers=3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7)`, 91
               classes; `weights=None` alone would give trainable BatchNorm2d in every stage.
               The trunk is the one `--config` names (`TORCH_TRUNKS`: resnet50, resnet101,
               resnext101_64x4d for the X-101 row...), trainable from the stage after the config's
               `frozen_stages`. FrozenBatchNorm2d has no trainable affine: for configs whose BN
               affine trains (X-101) our step updates those few vectors too.
               `min_size=800, max_size=1344` so its transform keeps the 800x1344 input;
               channels_last, 2 threads; `model(images, targets)`, `loss.backward()`, `SGD.step()`.

Each side runs in its own subprocess (its peak RSS, `ru_maxrss`, is its own) and reports the
median and min of `--steps` timed steps after `--warmup` untimed ones (for JAX the first compiles;
compile time is reported separately). Also timed: the forward pass with the loss alone (ours:
jitted without gradients; torchvision: `model(images, targets)` recording the graph), so
backward + update = step - forward; our target encoding (`train_step.encode_batch` jitted alone on
the same batch) as a share of our step; torchvision's own image transform inside its step.
With `--rounds N` the sides alternate N times and the lowest median of each timing counts (other
load on a shared machine only ever adds time).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import op_profile  # benchmarks/op_profile.py
from common import (  # benchmarks/common.py
    alternating_rounds,
    answer_as_worker,
    cpu_model,
    run_worker,
    timed,
)

REPO = Path(__file__).resolve().parents[1]
BOXES_PER_IMAGE = 8


def synthetic_inputs(batch: int, height: int, width: int):
    """Images [B, H, W, 3] float32 in [0, 1], boxes [B, n, 4] xyxy px (sides 16 to 600 px, log-
    uniform), class indices [B, n] in 0..79."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.random((batch, height, width, 3), dtype=np.float32)
    sizes = np.exp(rng.uniform(np.log(16), np.log(600), (batch, BOXES_PER_IMAGE, 2)))
    sizes = np.minimum(sizes, [width - 1, height - 1])
    x1 = rng.uniform(0, width - sizes[..., 0])
    y1 = rng.uniform(0, height - sizes[..., 1])
    boxes = np.stack([x1, y1, x1 + sizes[..., 0], y1 + sizes[..., 1]], -1).astype(np.float32)
    classes = rng.integers(0, 80, (batch, BOXES_PER_IMAGE)).astype(np.int32)
    return images, boxes, classes


# --------------------------------------------------------------------------------------------
# Workers


def jax_state_and_batch(config, mesh, batch_size: int, height: int, width: int):
    """(model, its jitted train step, step-0 state replicated on `mesh`, global batch of
    `synthetic_inputs` normalised as the config normalises, boxes padded to `data.max_boxes`) for
    `config`: what a benchmark of our train step runs (this script and accelerator_check.py)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from fcos_jax.models import build_model
    from fcos_jax.parallel import sharding
    from fcos_jax.training import optim, train_step

    model = build_model(config.model)
    init_hw = (64, 64)  # parameters do not depend on the image size
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *init_hw, 3)))
    optimizer, schedule, labels = optim.build_optimizer(config, shapes["params"], 1000)
    create = jax.jit(
        functools.partial(train_step.create_train_state, model, optimizer),
        static_argnums=1,
    )
    state = sharding.replicate(create(jax.random.key(0, impl="rbg"), init_hw), mesh)
    images, boxes, classes = synthetic_inputs(batch_size, height, width)
    m = int(config.data.max_boxes)
    padded_boxes = np.zeros((batch_size, m, 4), np.float32)
    padded_labels = np.zeros((batch_size, m), np.int32)
    valid = np.zeros((batch_size, m), bool)
    padded_boxes[:, :BOXES_PER_IMAGE] = boxes
    padded_labels[:, :BOXES_PER_IMAGE] = classes
    valid[:, :BOXES_PER_IMAGE] = True
    mean, std = np.asarray(config.preprocess.mean), np.asarray(config.preprocess.std)
    batch = sharding.to_global(
        dict(
            image=((images * 255 - mean) / std).astype(np.float32),
            boxes=padded_boxes,
            labels=padded_labels,
            box_valid=valid,
        ),
        mesh,
    )
    step = train_step.jit_train_step(
        train_step.make_train_step(config, model, optimizer, schedule, labels, mesh), mesh
    )
    return model, step, state, batch


def jax_worker(args) -> dict:
    import functools

    import jax

    sys.path.insert(0, str(REPO))
    from fcos_jax.config import load_config
    from fcos_jax.detection import losses
    from fcos_jax.parallel import sharding
    from fcos_jax.training import train_step
    from fcos_jax.utils import compile_cache, compile_options

    if args.cache_dir:
        compile_cache.enable(args.cache_dir)
    config = load_config(REPO / args.config)
    config.train.batch_size = args.batch  # only scales the learning rate
    config.train.accumulate_steps = args.accumulate
    mesh = sharding.make_mesh()
    model, step, state, batch = jax_state_and_batch(
        config, mesh, args.batch, args.height, args.width
    )
    labels = optimizer_labels(config, state.params)
    loss_kwargs = train_step._loss_kwargs(config)  # the step's own loss settings

    @functools.partial(jax.jit, compiler_options=compile_options.compiler_options())
    def forward_and_loss(params, batch_stats, batch):
        variables = {"params": params, "batch_stats": batch_stats}
        if train_step.trains_batch_stats(config):  # the step's BN mode: batch statistics
            outputs, _ = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
        else:
            outputs = model.apply(variables, batch["image"], train=True)
        batch_targets = train_step.encode_batch(config, batch)
        normalizers = losses.batch_normalizers(batch_targets)
        return losses.fcos_loss(outputs, batch_targets, normalizers=normalizers, **loss_kwargs)

    encode = jax.jit(functools.partial(train_step.encode_batch, config))

    start = time.perf_counter()
    step = step.lower(state, batch).compile()  # the executable itself: compiled once
    compiled_memory = step.memory_analysis()
    state, metrics = jax.block_until_ready(step(state, batch))
    compile_step = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        state, metrics = jax.block_until_ready(step(state, batch))
    holder = {"state": state}

    def one_step():
        holder["state"], out = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], out))

    step_times = timed(one_step, args.steps, warmup=0)  # warmed up above
    profile_wall = None
    if args.profile:
        profile_wall = op_profile.capture_jax(one_step, step.as_text(), args.steps, args.profile)
    state = holder["state"]
    start = time.perf_counter()
    jax.block_until_ready(forward_and_loss(state.params, state.batch_stats, batch))
    compile_forward = time.perf_counter() - start
    forward_times = timed(
        lambda: jax.block_until_ready(forward_and_loss(state.params, state.batch_stats, batch)),
        args.steps,
        warmup=0,  # its compiling call above
    )
    encode_times = timed(lambda: jax.block_until_ready(encode(batch)), args.steps)
    metrics = jax.device_get(metrics)
    return {
        "step": step_times,
        "forward+loss": forward_times,
        "encode": encode_times,
        "compile_s": {"step": compile_step, "forward+loss": compile_forward},
        "loss": float(metrics["loss"]),
        "num_pos": float(metrics["num_pos"]),
        "trainable_params": labels,
        "versions": {"jax": jax.__version__},
        # XLA's buffer assignment of the compiled step (arguments, outputs, temporaries).
        "xla_temp_gib": compiled_memory.temp_size_in_bytes / 2**30,
        "accumulate_steps": args.accumulate,
        "profile_wall_s": profile_wall,
    }


def optimizer_labels(config, params) -> int:
    """Number of parameters the optimizer updates (every label but frozen)."""
    import jax
    import numpy as np

    from fcos_jax.training import optim

    labels = optim.param_labels(params, config)
    sizes = jax.tree.map(lambda p, label: 0 if label == optim.FROZEN else p.size, params, labels)
    return int(np.sum(jax.tree.leaves(sizes)))


# (depth, groups, base width) of our config -> torchvision's ImageNet builder of the same trunk
TORCH_TRUNKS = {
    (50, 1, 64): "resnet50",
    (101, 1, 64): "resnet101",
    (101, 32, 8): "resnext101_32x8d",
    (101, 64, 4): "resnext101_64x4d",
}


def torch_worker(args) -> dict:
    import torch
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.fcos import FCOS
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    sys.path.insert(0, str(REPO))
    from fcos_jax.config import load_config

    b = load_config(REPO / args.config).model.backbone
    trunk = TORCH_TRUNKS.get((b.depth, b.groups, b.base_width))
    if trunk is None:
        raise SystemExit(f"{args.config}: no torchvision trunk for backbone {b.to_dict()}")
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    # fcos_resnet50_fpn(weights=COCO_V1) without the download, on the config's trunk:
    # FrozenBatchNorm2d, the stages our config trains (layer2..4 at frozen_stages=1), P6/P7 from
    # P5, 91 classes.
    backbone = getattr(torchvision.models, trunk)(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(
        backbone,
        4 - b.frozen_stages,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    model = FCOS(backbone, 91, min_size=args.height, max_size=args.width)
    model = model.to(memory_format=torch.channels_last)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        trainable, lr=0.01 * args.batch / 16, momentum=0.9, weight_decay=1e-4
    )

    images_np, boxes, classes = synthetic_inputs(args.batch, args.height, args.width)
    images = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images_np]
    targets = [
        {"boxes": torch.from_numpy(b), "labels": torch.from_numpy(c + 1).long()}
        for b, c in zip(boxes, classes, strict=True)
    ]
    losses = {}

    def one_step():
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses["loss"] = float(loss.detach())

    def forward_and_loss():
        loss_dict = model(images, targets)
        return float(sum(loss_dict.values()).detach())

    def transform():
        with torch.no_grad():
            model.transform(images, targets)

    for _ in range(args.warmup):
        one_step()
    step_times = timed(one_step, args.steps, warmup=0)  # warmed up above
    profile_wall = None
    if args.profile:
        profile_wall = op_profile.capture_torch(model, one_step, args.steps, args.profile)
    forward_times = timed(forward_and_loss, args.steps, warmup=0)
    transform_times = timed(transform, args.steps, warmup=0)
    first_conv = model.backbone.body.conv1.weight
    return {
        "step": step_times,
        "forward+loss": forward_times,
        "transform": transform_times,
        "loss": losses["loss"],
        "trainable_params": int(sum(p.numel() for p in trainable)),
        "channels_last": first_conv.is_contiguous(memory_format=torch.channels_last),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "profile_wall_s": profile_wall,
    }


# --------------------------------------------------------------------------------------------
# Orchestration


def run_side(side: str, args) -> dict:
    env = dict(os.environ)
    if side == "jax" and args.xla_flags:
        env["XLA_FLAGS"] = args.xla_flags
    flags = [
        "--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--batch", str(args.batch), "--height", str(args.height), "--width", str(args.width),
        "--torch-threads", str(args.torch_threads), "--accumulate", str(args.accumulate),
    ]  # fmt: skip
    if side == "jax" and args.cache_dir:
        flags += ["--cache-dir", args.cache_dir]
    if args.profile:
        flags += ["--profile", str(Path(args.profile) / side)]
    return run_worker(__file__, side, flags, env)


def fill_cache(args) -> dict:
    """The JAX worker that compiles into the empty `args.cache_dir` (one step after one warm-up):
    its compile times and its peak RSS, XLA's compilation peak. The timed JAX workers after it
    load their programs from the cache, so their peak RSS is the steady state."""
    return run_side(
        "jax", argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1, "profile": ""})
    )


def report(ours: dict, theirs: dict, args) -> None:
    def row(name, a, b):
        ratio = a["median"] / b["median"]
        print(
            f"| {name:<22} | {a['median']:7.2f} ({a['min']:.2f}) | {b['median']:7.2f} "
            f"({b['min']:.2f}) | {ratio:5.2f} |"
        )

    def derived(t):  # backward + update = step - forward, from the medians
        return {"median": t["step"]["median"] - t["forward+loss"]["median"], "min": float("nan")}

    print(
        f"\nFCOS train step ({args.config}), global batch {args.batch}, "
        f"{args.height}x{args.width}, float32, {os.cpu_count()} cores ({cpu_model()}), median "
        f"(min) of {args.steps} steps after {args.warmup} warm-up (best of {args.rounds} "
        "round(s)), seconds; ratio = ours / torchvision"
    )
    print(f"| {'':<22} | {'JAX (ours)':>13} | {'torchvision':>13} | ratio |")
    print(f"|{'-' * 24}|{'-' * 15}|{'-' * 15}|-------|")
    row("train step", ours["step"], theirs["step"])
    row("  forward + loss", ours["forward+loss"], theirs["forward+loss"])
    row("  backward + update", derived(ours), derived(theirs))
    print(
        f"| {'peak RSS (GiB)':<22} | {ours['max_rss_gib']:13.2f} | {theirs['max_rss_gib']:13.2f} "
        f"| {ours['max_rss_gib'] / theirs['max_rss_gib']:5.2f} |"
    )
    share = ours["encode"]["median"] / ours["step"]["median"]
    print(
        f"Target encoding (ours, jitted alone): {ours['encode']['median']:.3f} s median = "
        f"{100 * share:.1f} % of our step. torchvision's image transform inside its step: "
        f"{theirs['transform']['median']:.3f} s."
    )
    print(
        f"JAX compile (excluded above; in a cache-filling process whose peak RSS, compilation "
        f"included, was {ours['compile_rss_gib']:.2f} GiB): step {ours['compile_s']['step']:.0f} "
        f"s, forward+loss {ours['compile_s']['forward+loss']:.0f} s. Trainable parameters: ours "
        f"{ours['trainable_params']:,}, torchvision {theirs['trainable_params']:,}. Last loss: "
        f"ours {ours['loss']:.3f} ({ours['num_pos']:.0f} positives), torchvision "
        f"{theirs['loss']:.3f}."
    )
    print(
        f"torchvision: channels_last={theirs['channels_last']}, {args.torch_threads} threads. "
        f"Versions: {ours['versions']} {theirs['versions']}. Load average during ours "
        f"{ours['load'][0]:.1f} -> {ours['load'][1]:.1f}, torchvision {theirs['load'][0]:.1f} -> "
        f"{theirs['load'][1]:.1f} (on {os.cpu_count()} cores)."
    )
    for side, result in (("ours", ours), ("torchvision", theirs)):
        times = ", ".join(f"{t:.2f}" for t in result["step"]["all"])
        print(f"step times {side}: {times}")


def sweep(args) -> None:
    """Our step at each `--accumulate-sweep` value: time, peak RSS and XLA temporaries."""
    print(
        f"FCOS train step ({args.config}), global batch {args.batch}, {args.height}x"
        f"{args.width}, float32, {os.cpu_count()} cores ({cpu_model()}); median of {args.steps} "
        f"steps after {args.warmup} warm-up; peak RSS of a process with a warm compilation cache "
        "(steady state) and of the one that compiled"
    )
    print(
        "| accumulate_steps | step (s) | peak RSS (GiB) | peak RSS compiling (GiB) | "
        "XLA temporaries (GiB) | load |"
    )
    print("|---|---|---|---|---|---|")
    for k in (int(v) for v in args.accumulate_sweep.split(",")):
        args.accumulate = k
        compiling, r = fill_cache(args), run_side("jax", args)
        print(
            f"| {k} | {r['step']['median']:.2f} | {r['max_rss_gib']:.2f} | "
            f"{compiling['max_rss_gib']:.2f} | {r['xla_temp_gib']:.2f} | "
            f"{r['load'][0]:.1f} -> {r['load'][1]:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fcos_r50_caffe_fpn_gn_1x.py")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alternating worker runs per side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1344)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for our side only")
    parser.add_argument(
        "--accumulate", type=int, default=1, help="our train.accumulate_steps (micro-batches)"
    )
    parser.add_argument(
        "--accumulate-sweep",
        default="",
        help="e.g. 1,4: our step only, once per accumulate_steps value; peak RSS and XLA's "
        "temporary memory of each (no torchvision side)",
    )
    op_profile.add_flag(parser, "--steps")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first JAX step compiles)")

    if answer_as_worker(args, {"jax": jax_worker, "torch": torch_worker}):
        return

    with tempfile.TemporaryDirectory() as tmp:
        args.cache_dir = str(Path(tmp) / "jax_cache")
        if args.accumulate_sweep:
            sweep(args)
            return
        compiling = fill_cache(args)
        ours, theirs = alternating_rounds(lambda side: run_side(side, args), args.rounds)
    ours["compile_s"], ours["compile_rss_gib"] = compiling["compile_s"], compiling["max_rss_gib"]
    report(ours, theirs, args)
    if args.profile:
        op_profile.report(
            "train step, ms per step",
            Path(args.profile) / "jax",
            Path(args.profile) / "torch",
            (ours["profile_wall_s"], theirs["profile_wall_s"]),
        )


if __name__ == "__main__":
    main()
