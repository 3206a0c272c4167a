"""Inference speed on CPU: our FCOS R-50 (JAX, jit) against torchvision's fcos_resnet50_fpn.

  .venv/bin/python benchmarks/inference.py [--runs 7] [--height 800] [--width 1344]

Batch 1, a natural-looking 800x1344 network input (already normalised and padded, so neither
side's image transform is timed), the same seeded random weights on both sides (torchvision's
model, converted for ours; random but not identities, so thousands of candidates reach NMS).
Each side runs in its own subprocess (so its peak RSS, `ru_maxrss`, is its own) and reports the
median and min of `--runs` timed runs after one warm-up (for JAX the warm-up compiles; compile
time is reported separately); with `--rounds N` the two sides alternate N times and the round with
the lowest median counts (other load on a shared machine only ever adds time):
  forward          backbone + FPN + head
  forward+post     plus post-processing (torchvision: anchors, postprocess_detections)
  stages           backbone, FPN, head, post-processing timed one by one
The process CPU time per run (all threads) is reported too: on a shared, busy machine it is a
steadier measure of the work each side does than wall time.
torchvision runs in its fastest CPU configuration: channels_last, torch.inference_mode,
2 threads. XLA uses its defaults; `--xla-flags` passes XLA_FLAGS to our side for experiments.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "RESULT "


def timed(fn, runs: int) -> dict[str, float]:
    """Median and min wall time of `runs` calls of fn (which must block until done) after one
    untimed call, and the median CPU time of the process (all threads) per call."""
    fn()  # untimed: the first call after a compile or another program touches fresh memory
    times, cpu_times = [], []
    for _ in range(runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "median": statistics.median(times),
        "min": min(times),
        "cpu": statistics.median(cpu_times),
    }


# --------------------------------------------------------------------------------------------
# Workers


def jax_worker(args) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, str(REPO))
    from fcos_jax import postprocess
    from fcos_jax.config_io import load_config
    from fcos_jax.convert import convert_file
    from fcos_jax.models import build_model

    config = load_config(REPO / "configs" / "torchvision_fcos_r50_fpn.py")
    converted = convert_file(args.weights, "torchvision", config)
    variables = jax.device_put({"params": converted.params, "batch_stats": converted.batch_stats})
    params, stats = variables["params"], variables["batch_stats"]
    model = build_model(config.model)
    image = jax.device_put(np.load(args.input).transpose(0, 2, 3, 1))  # NCHW -> NHWC
    h, w = image.shape[1:3]
    t = config.test
    detect = jax.jit(
        lambda heads: postprocess.detect(
            heads,
            jax.numpy.array([[h, w]]),
            jax.numpy.ones((1, 2)),
            original_hw=jax.numpy.array([[h, w]]),
            mode=t.postprocess,
            strides=tuple(config.model.head.strides),
            nms_pre=t.nms_pre,
            score_thr=t.score_thr,
            nms_iou=t.nms_iou,
            max_per_img=t.max_per_img,
        )
    )
    forward = jax.jit(model.apply)
    # Stages take their parameters as arguments (closed-over arrays would become constants that
    # XLA may fold, which the whole-model program cannot do).
    backbone_vars = {"params": params["backbone"], "batch_stats": stats["backbone"]}
    neck_vars, head_vars = {"params": params["neck"]}, {"params": params["bbox_head"]}
    backbone = jax.jit(model.backbone.apply)
    neck = jax.jit(lambda v, feats: model.neck.apply(v, feats[1:]))
    head = jax.jit(model.bbox_head.apply)

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
    result = {
        "forward": timed(lambda: jax.block_until_ready(forward(variables, image)), runs),
        "forward+post": timed(
            lambda: jax.block_until_ready(detect(forward(variables, image))), runs
        ),
        "stages": {
            "backbone": timed(lambda: jax.block_until_ready(backbone(backbone_vars, image)), runs),
            "fpn": timed(lambda: jax.block_until_ready(neck(neck_vars, feats)), runs),
            "head": timed(lambda: jax.block_until_ready(head(head_vars, pyramid)), runs),
            "post": timed(lambda: jax.block_until_ready(detect(heads)), runs),
        },
        "compile_s": {"forward": compile_forward, "post": compile_post},
        "detections": int(np.asarray(dets["valid"]).sum()),
        "versions": {"jax": jax.__version__},
    }
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
    image = torch.from_numpy(np.load(args.input))
    if args.torch_memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    h, w = image.shape[-2:]
    images = ImageList(image, [(h, w)])

    def forward():
        features = list(model.backbone(image).values())
        return features, model.head(features)

    def post(features, head_outputs):
        anchors = model.anchor_generator(images, features)
        sizes = [f.size(2) * f.size(3) for f in features]
        split_heads = {k: list(v.split(sizes, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(sizes)) for a in anchors]
        dets = model.postprocess_detections(split_heads, split_anchors, images.image_sizes)
        return model.transform.postprocess(dets, images.image_sizes, [(h, w)])

    with torch.inference_mode():
        features, head_outputs = forward()  # warm-up
        dets = post(features, head_outputs)
        body = model.backbone.body(image)
        runs = args.runs
        result = {
            "forward": timed(forward, runs),
            "forward+post": timed(lambda: post(*forward()), runs),
            "stages": {
                "backbone": timed(lambda: model.backbone.body(image), runs),
                "fpn": timed(lambda: model.backbone.fpn(body), runs),
                "head": timed(lambda: model.head(features), runs),
                "post": timed(lambda: post(features, head_outputs), runs),
            },
            "detections": len(dets[0]["scores"]),
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        }
    return result


# --------------------------------------------------------------------------------------------
# Orchestration


def make_inputs(directory: Path, height: int, width: int) -> tuple[Path, Path]:
    """Seeded random torchvision FCOS weights (.pth) and a normalised NCHW input (.npy)."""
    import numpy as np
    import torch

    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    from synthetic_images import natural_image
    from torchvision_random import random_fcos

    rgb = natural_image(height, width, seed=0)
    model = random_fcos(0, rgb, min_size=min(height, width), max_size=max(height, width))
    weights = directory / "fcos_random.pth"
    torch.save(model.state_dict(), weights)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    image = ((rgb.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]
    path = directory / "input.npy"
    np.save(path, np.ascontiguousarray(image))
    return weights, path


def run_worker(side: str, args, weights: Path, image: Path) -> dict:
    env = dict(os.environ)
    if side == "jax" and args.xla_flags:
        env["XLA_FLAGS"] = args.xla_flags
    command = [
        sys.executable, __file__, "--worker", side, "--weights", str(weights),
        "--input", str(image), "--runs", str(args.runs),
        "--torch-threads", str(args.torch_threads),
        "--torch-memory-format", args.torch_memory_format,
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK) :])


def best_round(rounds: list[dict]) -> dict:
    """Per timing, the round with the lowest median (a busy machine only ever adds time)."""
    best = dict(rounds[0])

    def pick(get):
        return min((get(r) for r in rounds), key=lambda t: t["median"])

    for key in ("forward", "forward+post"):
        best[key] = pick(lambda r, key=key: r[key])
    best["stages"] = {
        stage: pick(lambda r, stage=stage: r["stages"][stage]) for stage in rounds[0]["stages"]
    }
    best["max_rss_gib"] = max(r["max_rss_gib"] for r in rounds)
    return best


def report(ours: dict, theirs: dict, args) -> None:
    def row(name, a, b):
        ratio = a["median"] / b["median"]
        print(
            f"| {name:<16} | {a['median']:7.3f} ({a['min']:.3f}) | {b['median']:7.3f} "
            f"({b['min']:.3f}) | {ratio:5.2f} | {a['cpu']:7.3f} | {b['cpu']:7.3f} | "
            f"{a['cpu'] / b['cpu']:5.2f} |"
        )

    print(
        f"\nFCOS R-50 FPN, batch 1, {args.height}x{args.width}, float32, CPU "
        f"({os.cpu_count()} cores), median (min) wall seconds of {args.runs} runs (best of "
        f"{args.rounds} round(s)) and median process CPU seconds (all threads) per run; "
        f"ratio = ours / torchvision"
    )
    print(
        f"| {'wall s':<16} | {'JAX (ours)':>15} | {'torchvision':>15} | ratio | "
        f"{'CPU s ours':>7} | {'CPU s tv':>7} | ratio |"
    )
    print(f"|{'-' * 18}|{'-' * 17}|{'-' * 17}|-------|---------|---------|-------|")
    row("forward", ours["forward"], theirs["forward"])
    row("forward+post", ours["forward+post"], theirs["forward+post"])
    for stage in ("backbone", "fpn", "head", "post"):
        row(f"  {stage}", ours["stages"][stage], theirs["stages"][stage])
    print(
        f"| {'peak RSS (GiB)':<16} | {ours['max_rss_gib']:15.2f} | {theirs['max_rss_gib']:15.2f} | "
        f"{ours['max_rss_gib'] / theirs['max_rss_gib']:5.2f} |         |         |       |"
    )
    print(
        f"JAX compile (excluded above): forward {ours['compile_s']['forward']:.1f} s, "
        f"post-processing {ours['compile_s']['post']:.1f} s. Detections: ours "
        f"{ours['detections']}, torchvision {theirs['detections']}."
    )
    print(
        f"torchvision: {args.torch_memory_format}, inference_mode, {args.torch_threads} threads. "
        f"Versions: {ours['versions']} {theirs['versions']}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1, help="alternating worker runs per side")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1344)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument(
        "--torch-memory-format", choices=("channels_last", "contiguous"), default="channels_last"
    )
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for our side only")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = (jax_worker if args.worker == "jax" else torch_worker)(args)
        result["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(MARK + json.dumps(result), flush=True)
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        weights, image = make_inputs(Path(tmp), args.height, args.width)
        results = {"torch": [], "jax": []}
        for _ in range(args.rounds):  # alternate the sides so a change of load hits both
            for side in ("torch", "jax"):
                results[side].append(run_worker(side, args, weights, image))
    report(best_round(results["jax"]), best_round(results["torch"]), args)
    print(
        f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
        "(other processes on this machine slow both sides)"
    )


if __name__ == "__main__":
    main()
