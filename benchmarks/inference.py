"""Inference speed on CPU: our FCOS R-50 (JAX, jit) against torchvision's fcos_resnet50_fpn.

  .venv/bin/python benchmarks/inference.py [--runs 7] [--rounds 2] [--height 800] [--width 1344]
  .venv/bin/python benchmarks/inference.py --batches 1,2,4 [--runs 5]   # throughput mode

A natural-looking 800x1344 network input (already normalised and padded, so neither side's image
transform is timed), the same seeded random weights on both sides (torchvision's model; ours is
that .pth converted by `python -m fcos_jax.convert` beforehand, so torch is never loaded in the
JAX worker); random but not identities, so thousands of candidates reach NMS.
Each side runs in its own subprocess (so its peak RSS, `ru_maxrss`, is its own) and reports the
median and min of `--runs` timed runs after one warm-up. The JAX side first runs once in a
process of its own that compiles into a fresh persistent compilation cache: its compile times and
peak RSS (XLA's compilation peak included) are reported apart; the timed JAX processes load the
compiled programs from that cache, so their peak RSS is the steady state, as torch's is. With
`--rounds N` the two sides alternate N times and the round with the lowest median counts (other
load on a shared machine only ever adds time).
  forward          backbone + FPN + head, batch 1
  forward+post     plus post-processing (torchvision: anchors, postprocess_detections)
  stages           backbone, FPN, head, post-processing timed one by one
  --batches B,..   throughput mode instead: forward + post-processing of a batch of B different
                   images on one canvas, images per second at each B
The process CPU time per run (all threads) is reported too: on a shared, busy machine it is a
steadier measure of the work each side does than wall time. The device is the one JAX gives
(printed); nothing in the timed code is CPU-specific.
torchvision runs in its fastest CPU configuration: channels_last, torch.inference_mode,
2 threads. XLA uses its defaults; `--xla-flags` passes XLA_FLAGS to our side for experiments.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (  # benchmarks/common.py
    alternating_rounds,
    answer_as_worker,
    cpu_model,
    run_worker,
    timed,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Workers


def jax_worker(args) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, str(REPO))
    from fcos_jax.checkpoint import store
    from fcos_jax.config import load_config
    from fcos_jax.detection import postprocess
    from fcos_jax.models import build_model
    from fcos_jax.utils import compile_cache, compile_options

    compile_cache.enable(args.cache_dir)
    config = load_config(REPO / "configs" / "torchvision_fcos_r50_fpn.py")
    variables, _ = store.restore_inference(args.checkpoint, config)
    params, stats = variables["params"], variables["batch_stats"]
    model = build_model(config.model)
    images = jax.device_put(np.load(args.input).transpose(0, 2, 3, 1))  # NCHW -> NHWC
    h, w = images.shape[1:3]
    t = config.test

    @jax.jit
    def detect(heads):
        n = jax.tree.leaves(heads)[0].shape[0]
        hw = jax.numpy.broadcast_to(jax.numpy.array([h, w]), (n, 2))
        return postprocess.detect(
            heads,
            hw,
            jax.numpy.ones((n, 2)),
            original_hw=hw,
            mode=t.postprocess,
            strides=tuple(config.model.head.strides),
            nms_pre=t.nms_pre,
            score_thr=t.score_thr,
            nms_iou=t.nms_iou,
            max_per_img=t.max_per_img,
        )

    options = compile_options.compiler_options()  # the library's own (fcos_jax.inference)
    forward = jax.jit(model.apply, compiler_options=options)
    result = {"device": str(jax.devices()[0].device_kind), "versions": {"jax": jax.__version__}}
    if args.batches:
        result["compile_s"], result["batches"] = {}, {}
        for batch in args.batches:
            image = images[:batch]
            start = time.perf_counter()
            dets = jax.block_until_ready(detect(forward(variables, image)))
            result["compile_s"][batch] = time.perf_counter() - start
            result["batches"][batch] = timed(
                lambda image=image: jax.block_until_ready(detect(forward(variables, image))),
                args.runs,
            )
        result["detections"] = int(np.asarray(dets["valid"]).sum())
        return result
    image = images[:1]
    # Stages take their parameters as arguments (closed-over arrays would become constants that
    # XLA may fold, which the whole-model program cannot do).
    backbone_vars = {"params": params["backbone"], "batch_stats": stats["backbone"]}
    neck_vars, head_vars = {"params": params["neck"]}, {"params": params["bbox_head"]}
    backbone = jax.jit(model.backbone.apply, compiler_options=options)
    neck = jax.jit(lambda v, feats: model.neck.apply(v, feats[1:]), compiler_options=options)
    head = jax.jit(model.bbox_head.apply, compiler_options=options)

    start = time.perf_counter()
    heads = jax.block_until_ready(forward(variables, image))
    compile_forward = time.perf_counter() - start
    start = time.perf_counter()
    dets = jax.block_until_ready(detect(heads))
    compile_post = time.perf_counter() - start
    feats = jax.block_until_ready(backbone(backbone_vars, image))
    pyramid = jax.block_until_ready(neck(neck_vars, feats))
    jax.block_until_ready(head(head_vars, pyramid))

    runs = args.runs
    result.update(
        {
            "forward": timed(lambda: jax.block_until_ready(forward(variables, image)), runs),
            "forward+post": timed(
                lambda: jax.block_until_ready(detect(forward(variables, image))), runs
            ),
            "stages": {
                "backbone": timed(
                    lambda: jax.block_until_ready(backbone(backbone_vars, image)), runs
                ),
                "fpn": timed(lambda: jax.block_until_ready(neck(neck_vars, feats)), runs),
                "head": timed(lambda: jax.block_until_ready(head(head_vars, pyramid)), runs),
                "post": timed(lambda: jax.block_until_ready(detect(heads)), runs),
            },
            "compile_s": {"forward": compile_forward, "post": compile_post},
            "detections": int(np.asarray(dets["valid"]).sum()),
        }
    )
    return result


def torch_worker(args) -> dict:
    import numpy as np
    import torch
    import torchvision
    from torchvision.models.detection import fcos_resnet50_fpn
    from torchvision.models.detection.image_list import ImageList

    torch.set_num_threads(args.torch_threads)
    model = fcos_resnet50_fpn(weights=None, weights_backbone=None)
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    model.eval()
    images = torch.from_numpy(np.load(args.input))
    if args.torch_memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    h, w = images.shape[-2:]

    def forward(image):
        features = list(model.backbone(image).values())
        return features, model.head(features)

    def post(image, features, head_outputs):
        sizes_hw = [(h, w)] * image.shape[0]
        image_list = ImageList(image, sizes_hw)
        anchors = model.anchor_generator(image_list, features)
        sizes = [f.size(2) * f.size(3) for f in features]
        split_heads = {k: list(v.split(sizes, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(sizes)) for a in anchors]
        dets = model.postprocess_detections(split_heads, split_anchors, image_list.image_sizes)
        return model.transform.postprocess(dets, image_list.image_sizes, sizes_hw)

    result = {"versions": {"torch": torch.__version__, "torchvision": torchvision.__version__}}
    with torch.inference_mode():
        if args.batches:
            result["batches"] = {}
            for batch in args.batches:
                image = images[:batch]
                dets = post(image, *forward(image))  # warm-up
                result["batches"][batch] = timed(
                    lambda image=image: post(image, *forward(image)), args.runs
                )
            result["detections"] = sum(len(d["scores"]) for d in dets)
            return result
        image = images[:1]
        features, head_outputs = forward(image)  # warm-up
        dets = post(image, features, head_outputs)
        body = model.backbone.body(image)
        runs = args.runs
        result.update(
            {
                "forward": timed(lambda: forward(image), runs),
                "forward+post": timed(lambda: post(image, *forward(image)), runs),
                "stages": {
                    "backbone": timed(lambda: model.backbone.body(image), runs),
                    "fpn": timed(lambda: model.backbone.fpn(body), runs),
                    "head": timed(lambda: model.head(features), runs),
                    "post": timed(lambda: post(image, features, head_outputs), runs),
                },
                "detections": len(dets[0]["scores"]),
            }
        )
    return result


# --------------------------------------------------------------------------------------------
# Orchestration


def make_inputs(directory: Path, height: int, width: int, count: int) -> tuple[Path, Path, Path]:
    """Seeded random torchvision FCOS weights (.pth), the same weights converted for ours (a
    checkpoint directory, by the convert CLI in its own process) and `count` different
    normalised NCHW images (.npy)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from fcos_jax.compare.torchvision_random import random_fcos
    from fcos_jax.testing.images import natural_image

    rgbs = [natural_image(height, width, seed=i) for i in range(count)]
    model = random_fcos(0, rgbs[0], min_size=min(height, width), max_size=max(height, width))
    weights = directory / "fcos_random.pth"
    torch.save(model.state_dict(), weights)
    converted = directory / "converted"
    command = [
        sys.executable, "-m", "fcos_jax.convert", "--format=torchvision",
        f"--config={REPO / 'configs' / 'torchvision_fcos_r50_fpn.py'}", f"--input={weights}",
        f"--output={converted}",
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    image = np.stack(
        [((rgb.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1) for rgb in rgbs]
    )
    path = directory / "input.npy"
    np.save(path, np.ascontiguousarray(image))
    return weights, converted, path


def run_side(side: str, args, paths: dict[str, Path]) -> dict:
    env = dict(os.environ)
    if side == "jax" and args.xla_flags:
        env["XLA_FLAGS"] = args.xla_flags
    flags = [
        "--weights", str(paths["weights"]), "--checkpoint", str(paths["checkpoint"]),
        "--cache-dir", str(paths["cache"]), "--input", str(paths["input"]),
        "--runs", str(args.runs), "--torch-threads", str(args.torch_threads),
        "--torch-memory-format", args.torch_memory_format,
    ]  # fmt: skip
    if args.batches:
        flags += ["--batches", ",".join(map(str, args.batches))]
    return run_worker(__file__, side, flags, env)


def _header(args, what: str) -> None:
    print(
        f"\nFCOS R-50 FPN, {what}, {args.height}x{args.width}, float32, "
        f"{os.cpu_count()} cores ({cpu_model()}), median (min) wall seconds of {args.runs} runs "
        f"(best of {args.rounds} round(s)) and median process CPU seconds (all threads) per run; "
        f"ratio = ours / torchvision"
    )


def report(ours: dict, theirs: dict, warmup: dict, args) -> None:
    def row(name, a, b):
        ratio = a["median"] / b["median"]
        print(
            f"| {name:<16} | {a['median']:7.3f} ({a['min']:.3f}) | {b['median']:7.3f} "
            f"({b['min']:.3f}) | {ratio:5.2f} | {a['cpu']:7.3f} | {b['cpu']:7.3f} | "
            f"{a['cpu'] / b['cpu']:5.2f} |"
        )

    _header(args, "batch 1")
    print(
        f"| {'wall s':<16} | {'JAX (ours)':>15} | {'torchvision':>15} | ratio | "
        f"{'CPU s ours':>7} | {'CPU s tv':>7} | ratio |"
    )
    print(f"|{'-' * 18}|{'-' * 17}|{'-' * 17}|-------|---------|---------|-------|")
    row("forward", ours["forward"], theirs["forward"])
    row("forward+post", ours["forward+post"], theirs["forward+post"])
    for stage in ("backbone", "fpn", "head", "post"):
        row(f"  {stage}", ours["stages"][stage], theirs["stages"][stage])
    _rss_row(ours, theirs)
    print(
        f"JAX compile (excluded above; in the cache-filling process, peak RSS there "
        f"{warmup['max_rss_gib']:.2f} GiB): forward {warmup['compile_s']['forward']:.1f} s, "
        f"post-processing {warmup['compile_s']['post']:.1f} s. Detections: ours "
        f"{ours['detections']}, torchvision {theirs['detections']}."
    )
    _footer(ours, theirs, args)


def report_throughput(ours: dict, theirs: dict, warmup: dict, args) -> None:
    _header(args, "forward + post-processing per batch on one canvas")
    print(
        "| batch | JAX (ours) s | img/s | torchvision s | img/s | img/s ratio (ours / tv) | "
        "CPU s ours | CPU s tv |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        a, b = ours["batches"][str(batch)], theirs["batches"][str(batch)]
        rate_a, rate_b = batch / a["median"], batch / b["median"]
        print(
            f"| {batch} | {a['median']:.3f} ({a['min']:.3f}) | {rate_a:.3f} | {b['median']:.3f} "
            f"({b['min']:.3f}) | {rate_b:.3f} | {rate_a / rate_b:.2f} | {a['cpu']:.3f} | "
            f"{b['cpu']:.3f} |"
        )
    _rss_row(ours, theirs)
    compiles = ", ".join(f"batch {b} {t:.1f} s" for b, t in warmup["compile_s"].items())
    print(
        f"JAX compile (excluded; cache-filling process, peak RSS {warmup['max_rss_gib']:.2f} "
        f"GiB): {compiles}. Detections over all batches: ours {ours['detections']}, "
        f"torchvision {theirs['detections']}."
    )
    _footer(ours, theirs, args)


def _rss_row(ours: dict, theirs: dict) -> None:
    print(
        f"peak RSS (GiB, steady state: JAX from a warm compilation cache): ours "
        f"{ours['max_rss_gib']:.2f}, torchvision {theirs['max_rss_gib']:.2f}, ratio "
        f"{ours['max_rss_gib'] / theirs['max_rss_gib']:.2f}"
    )


def _footer(ours: dict, theirs: dict, args) -> None:
    print(
        f"JAX device: {ours['device']}. torchvision: {args.torch_memory_format}, inference_mode, "
        f"{args.torch_threads} threads. Versions: {ours['versions']} {theirs['versions']}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1, help="alternating worker runs per side")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1344)
    parser.add_argument(
        "--batches",
        type=lambda v: [int(b) for b in v.split(",")],
        default=None,
        help="throughput mode: comma-separated batch sizes, e.g. 1,2,4",
    )
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument(
        "--torch-memory-format", choices=("channels_last", "contiguous"), default="channels_last"
    )
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for our side only")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if answer_as_worker(args, {"jax": jax_worker, "torch": torch_worker}):
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        count = max(args.batches or [1])
        weights, converted, image = make_inputs(Path(tmp), args.height, args.width, count)
        paths = {"weights": weights, "checkpoint": converted, "input": image}
        paths["cache"] = Path(tmp) / "jax_cache"
        warmup = run_side("jax", args, paths)  # compiles into the empty cache
        ours, theirs = alternating_rounds(lambda side: run_side(side, args, paths), args.rounds)
    (report_throughput if args.batches else report)(ours, theirs, warmup, args)
    print(
        f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
        "(other processes on this machine slow both sides)"
    )


if __name__ == "__main__":
    main()
