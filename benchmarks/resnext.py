"""ResNeXt backbone speed on CPU: our X-101-64x4d (JAX, jit) against torchvision's resnext101_64x4d.

  .venv/bin/python benchmarks/resnext.py [--modes forward,backward] [--runs 3] [--rounds 1]
      [--forward-size 1,800,1344] [--backward-size 2,320,320]
      [--profile DIR]   (per-operation table of both sides: benchmarks/op_profile.py)

Both sides are the same network (torchvision's `resnext101_64x4d` body, conv1 to layer4, is
mmdetection's X-101-64x4d pytorch-style backbone) with the same seeded random weights: torchvision's
state dict, converted for ours by `fcos_jax.convert` (`--format backbone`); BatchNorm in inference
mode on both sides (running statistics, affine parameters). Modes:
  forward    C2..C5 of a batch of `--forward-size` (B,H,W) normalised random images; torchvision in
             torch.inference_mode.
  backward   forward and backward of the same, every stage trainable (our `frozen_stages=-1`;
             torchvision: every parameter requires grad), loss = sum over C2..C5 of the mean of the
             map; gradients of every parameter (convolutions and BN affine), none of the image.
Each side runs in its own subprocess (its peak RSS, `ru_maxrss`, is its own) and reports the median
and min of `--runs` timed runs after one untimed run (for JAX the warm-up compiles; compile time is
reported separately) and the median process CPU time per run (all threads: on a busy shared
machine the steadier measure). With `--rounds N` the sides alternate N times and the round with the
lowest median counts. The largest relative difference of C5 (forward mode) tells that both sides
computed the same network. torchvision runs channels_last with `--torch-threads` (2) threads; XLA
uses its defaults (`--xla-flags` passes XLA_FLAGS to our side).
The FCOS X-101 train step is timed by `benchmarks/train_step.py --config
configs/fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x.py`.
"""

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import op_profile  # noqa: E402  (benchmarks/op_profile.py)
from common import (  # noqa: E402  (benchmarks/common.py)
    alternating_rounds,
    answer_as_worker,
    run_worker,
    synthetic_images,
    timed,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x.py"
MODES = ("forward", "backward")


# --------------------------------------------------------------------------------------------
# Workers


def jax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(REPO))
    from fcos_jax.config import load_config
    from fcos_jax.convert import convert_file
    from fcos_jax.models import build_model
    from fcos_jax.utils import compile_options

    config = load_config(CONFIG)
    config.model.backbone.frozen_stages = -1  # every stage trainable (backward mode)
    converted = convert_file(args.weights, "backbone", config)
    params = jax.device_put(converted.params["backbone"])
    stats = jax.device_put(converted.batch_stats["backbone"])
    backbone = build_model(config.model).backbone
    images = jax.device_put(synthetic_images(*args.size))
    options = compile_options.compiler_options()  # as the library's own programs

    if args.mode == "forward":
        run = jax.jit(
            lambda p, s, x: backbone.apply({"params": p, "batch_stats": s}, x),
            compiler_options=options,
        )
    else:

        def loss(p, s, x):
            outputs = backbone.apply({"params": p, "batch_stats": s}, x)
            return sum(jnp.mean(o) for o in outputs)

        run = jax.jit(jax.value_and_grad(loss), compiler_options=options)
    start = time.perf_counter()
    run = run.lower(params, stats, images).compile()
    out = jax.block_until_ready(run(params, stats, images))
    compile_s = time.perf_counter() - start
    result = {
        "time": timed(lambda: jax.block_until_ready(run(params, stats, images)), args.runs),
        "compile_s": compile_s,
        "versions": {"jax": jax.__version__},
    }
    if args.profile:
        result["profile_wall_s"] = op_profile.capture_jax(
            lambda: jax.block_until_ready(run(params, stats, images)),
            run.as_text(),
            args.runs,
            args.profile,
        )
    if args.mode == "forward":
        np.save(args.output, np.asarray(out[-1]))
    return result


def torch_model(weights: str):
    import torch
    import torchvision

    model = torchvision.models.resnext101_64x4d(weights=None)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()  # BatchNorm on its running statistics, as our frozen_bn
    return model.to(memory_format=torch.channels_last)


def torch_body(model, x) -> list:
    """C2..C5 of torchvision's ResNet (its forward up to layer4)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outputs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        outputs.append(x)
    return outputs


def torch_worker(args) -> dict:
    import numpy as np
    import torch
    import torchvision

    torch.set_num_threads(args.torch_threads)
    model = torch_model(args.weights)
    images = torch.from_numpy(synthetic_images(*args.size)).permute(0, 3, 1, 2)
    images = images.contiguous(memory_format=torch.channels_last)
    if args.mode == "forward":
        with torch.inference_mode():
            out = torch_body(model, images)
            np.save(args.output, out[-1].permute(0, 2, 3, 1).numpy())
            times = timed(lambda: torch_body(model, images), args.runs)
    else:

        def step():
            model.zero_grad(set_to_none=True)
            loss = sum(o.mean() for o in torch_body(model, images))
            loss.backward()

        times = timed(step, args.runs)
    result = {
        "time": times,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }
    if args.profile:
        if args.mode == "forward":
            with torch.inference_mode():
                wall = op_profile.capture_torch(
                    model, lambda: torch_body(model, images), args.runs, args.profile
                )
        else:
            wall = op_profile.capture_torch(model, step, args.runs, args.profile)
        result["profile_wall_s"] = wall
    return result


# --------------------------------------------------------------------------------------------
# Orchestration


def make_weights(path: Path) -> None:
    """Seeded random resnext101_64x4d weights, BN statistics and affine randomised too (so a
    layout error in the conversion or the grouped convolution would change C5)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnext101_64x4d(weights=None)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
        for name, param in model.named_parameters():
            if "bn" in name or "downsample.1" in name:
                param.uniform_(0.5, 1.0) if name.endswith("weight") else param.normal_(0.0, 0.1)
    torch.save(model.state_dict(), path)


def run_side(side: str, mode: str, size: str, args, weights: Path, outputs: dict) -> dict:
    """One side's worker for `mode`; it writes its C5 to `outputs[side]`."""
    env = dict(os.environ)
    if side == "jax" and args.xla_flags:
        env["XLA_FLAGS"] = args.xla_flags
    flags = [
        "--mode", mode, "--size", size, "--weights", str(weights), "--output", str(outputs[side]),
        "--runs", str(args.runs), "--torch-threads", str(args.torch_threads),
    ]  # fmt: skip
    if args.profile:
        flags += ["--profile", str(Path(args.profile) / f"{mode}_{side}")]
    return run_worker(__file__, side, flags, env)


def report(mode: str, size: str, ours: dict, theirs: dict, c5_diff: float | None, args) -> None:
    a, b = ours["time"], theirs["time"]
    what = {"forward": "forward (C2..C5)", "backward": "forward + backward, every stage trainable"}
    print(
        f"\nX-101-64x4d backbone {what[mode]}, B,H,W = {size}, float32, CPU ({os.cpu_count()} "
        f"cores), median (min) wall s of {args.runs} runs (best of {args.rounds} round(s)), median "
        f"process CPU s per run; ratio = ours / torchvision"
    )
    print("| | JAX (ours) | torchvision | ratio |")
    print("|---|---|---|---|")
    print(
        f"| wall s | {a['median']:.3f} ({a['min']:.3f}) | {b['median']:.3f} ({b['min']:.3f}) | "
        f"{a['median'] / b['median']:.2f} |"
    )
    print(f"| CPU s | {a['cpu']:.3f} | {b['cpu']:.3f} | {a['cpu'] / b['cpu']:.2f} |")
    print(
        f"| peak RSS GiB | {ours['max_rss_gib']:.2f} | {theirs['max_rss_gib']:.2f} | "
        f"{ours['max_rss_gib'] / theirs['max_rss_gib']:.2f} |"
    )
    extra = f"; C5 max |ours - torch| / max |torch| = {c5_diff:.1e}" if c5_diff is not None else ""
    print(
        f"JAX compile (excluded): {ours['compile_s']:.1f} s{extra}. Load average during ours "
        f"{ours['load'][0]:.1f} -> {ours['load'][1]:.1f}, torchvision {theirs['load'][0]:.1f} -> "
        f"{theirs['load'][1]:.1f}. torchvision channels_last, {args.torch_threads} threads. "
        f"Versions: {ours['versions']} {theirs['versions']}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="forward,backward", help="comma list of " + str(MODES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="alternating worker runs per side")
    parser.add_argument("--forward-size", default="1,800,1344", help="B,H,W of forward mode")
    parser.add_argument("--backward-size", default="2,320,320", help="B,H,W of backward mode")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for our side only")
    op_profile.add_flag(parser, "--runs")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.size = tuple(int(v) for v in args.size.split(","))
    if answer_as_worker(args, {"jax": jax_worker, "torch": torch_worker}):
        return

    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            parser.error(f"--modes: {mode!r} not one of {', '.join(MODES)}")
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "resnext101_64x4d_random.pth"
        make_weights(weights)
        for mode in modes:
            size = args.forward_size if mode == "forward" else args.backward_size
            outputs = {side: Path(tmp) / f"c5_{side}.npy" for side in ("torch", "jax")}
            run_mode = functools.partial(
                run_side, mode=mode, size=size, args=args, weights=weights, outputs=outputs
            )
            ours, theirs = alternating_rounds(run_mode, args.rounds)
            c5_diff = None
            if mode == "forward":
                c5_ours, c5_torch = np.load(outputs["jax"]), np.load(outputs["torch"])
                c5_diff = float(np.abs(c5_ours - c5_torch).max() / np.abs(c5_torch).max())
            report(mode, size, ours, theirs, c5_diff, args)
            if args.profile:
                op_profile.report(
                    f"{mode}, ms per run",
                    Path(args.profile) / f"{mode}_jax",
                    Path(args.profile) / f"{mode}_torch",
                    (ours["profile_wall_s"], theirs["profile_wall_s"]),
                )


if __name__ == "__main__":
    main()
