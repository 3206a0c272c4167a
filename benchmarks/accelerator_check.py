"""One check of the accelerator path, for the day a GPU or TPU is at hand: parity, speed against
torchvision on the same device, and what the programs move between devices. Prints one table.

  .venv/bin/python benchmarks/accelerator_check.py            # full size, on JAX's device
  .venv/bin/python benchmarks/accelerator_check.py --tiny     # small sizes (a CPU: minutes)

  parity       `python -m fcos_jax.compare --format torchvision` on seeded random
               `fcos_resnet50_fpn` weights and a natural-looking image, our side at
               `jax_default_matmul_precision=highest` (exit status 0: head outputs within 1e-4
               of torchvision's and the same detections).
  train step   the R-50 caffe GN row (`configs/fcos_r50_caffe_fpn_gn_1x.py`), `train_step`'s step
               on every local device, float32 and bfloat16 (`model.dtype`), against
               torchvision's FCOS R-50 (FrozenBatchNorm2d, stages 2-4 trainable, SGD) in float32
               and under bfloat16 autocast (AMP); images/s and peak device memory.
  inference    `Detector` (the converted random weights, forward + post-processing, the batch
               split over the local devices) against torchvision's `fcos_resnet50_fpn` in eval
               mode, batches of 1 and 8 different images; images/s.
  collectives  the train step (k = 1) and the evaluation's predict step compiled on all local
               devices (`fcos_jax.training.communication`): all-reduce count and bytes against the
               trainable parameters' bytes; collectives inside loops (want 0).

Each part runs in a process of its own (JAX and torch never share a device's memory). torch runs
on CUDA when it has it, else on the CPU. Full size: 800x1344 images, train batch 4 per device,
`--steps` timed steps / runs after warm-up (median). `--tiny`: 128x192 images, batch 1, one
timed step: the same code, for the test that keeps this script working
(tests/test_accelerator_check.py).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import answer_as_worker, cpu_model, run_worker, timed  # benchmarks/common.py
from inference import make_inputs  # benchmarks/inference.py
from train_step import jax_state_and_batch, synthetic_inputs  # benchmarks/train_step.py

REPO = Path(__file__).resolve().parents[1]
R50_GN = REPO / "configs" / "fcos_r50_caffe_fpn_gn_1x.py"
TORCHVISION = REPO / "configs" / "torchvision_fcos_r50_fpn.py"
SIZES = {  # (height, width, train batch per device, inference batches, timed steps)
    "full": (800, 1344, 4, (1, 8), 10),
    "tiny": (128, 192, 1, (1, 8), 1),
}


# --------------------------------------------------------------------------------------------
# Workers (each in its own process)


def _jax_peak_memory_gib() -> float | None:
    """Peak bytes in use on the first local device (GPU/TPU), None where JAX does not track it
    (CPU: the peak RSS stands in)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def jax_train(args) -> dict:
    import jax

    sys.path.insert(0, str(REPO))
    from fcos_jax.config import load_config
    from fcos_jax.parallel import sharding

    mesh = sharding.make_mesh(jax.local_devices())
    batch_size = args.batch * mesh.size
    config = load_config(R50_GN)
    config.model.dtype = args.dtype
    config.train.batch_size = batch_size
    _, step, state, batch = jax_state_and_batch(config, mesh, batch_size, args.height, args.width)
    start = time.perf_counter()
    step = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics)

    times = timed(one_step, args.steps, warmup=2)
    return {
        "images_per_s": batch_size / times["median"],
        "step": times,
        "compile_s": compile_s,
        "peak_device_gib": _jax_peak_memory_gib(),
        "devices": mesh.size,
    }


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_peak_memory_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def torch_train(args) -> dict:
    import torch
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.fcos import FCOS
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    device = _torch_device()
    torch.manual_seed(0)
    backbone = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(
        backbone, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    model = FCOS(backbone, 91, min_size=args.height, max_size=args.width).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.001, momentum=0.9, weight_decay=1e-4)
    images_np, boxes, classes = synthetic_inputs(args.batch, args.height, args.width)
    images = [torch.from_numpy(im).permute(2, 0, 1).contiguous().to(device) for im in images_np]
    targets = [
        {
            "boxes": torch.from_numpy(b).to(device),
            "labels": torch.from_numpy(c + 1).long().to(device),
        }
        for b, c in zip(boxes, classes, strict=True)
    ]
    amp = args.dtype == "bfloat16"

    def one_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = timed(one_step, args.steps, warmup=2)
    return {
        "images_per_s": args.batch / times["median"],
        "step": times,
        "peak_device_gib": _torch_peak_memory_gib(device),
        "device": str(device),
    }


def jax_infer(args) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, str(REPO))
    from fcos_jax import inference
    from fcos_jax.config import load_config

    config = load_config(TORCHVISION)
    detector = inference.Detector.from_config(config, args.checkpoint)
    images = np.load(args.input).transpose(0, 2, 3, 1)  # NCHW -> NHWC, normalised
    result = {"devices": detector.mesh.size, "device": jax.devices()[0].device_kind}
    for batch in args.batches:
        image = images[:batch]
        hw = np.broadcast_to(np.asarray(image.shape[1:3], np.int32), (batch, 2))
        scale = np.ones((batch, 2), np.float32)
        times = timed(lambda image=image, hw=hw, scale=scale: detector.detect_batch(
            image, hw, scale, hw), args.steps, warmup=2)  # fmt: skip
        result[f"batch_{batch}"] = {"images_per_s": batch / times["median"], "time": times}
    return result


def torch_infer(args) -> dict:
    import numpy as np
    import torch
    from torchvision.models.detection import fcos_resnet50_fpn

    device = _torch_device()
    images = torch.from_numpy(np.load(args.input))
    height, width = images.shape[-2:]
    model = fcos_resnet50_fpn(weights=None, weights_backbone=None)
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    # The input is normalised and padded already: identity transform (no resize, no normalise).
    model.transform.min_size, model.transform.max_size = (min(height, width),), max(height, width)
    model.transform.image_mean, model.transform.image_std = [0.0] * 3, [1.0] * 3
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    result = {}
    with torch.inference_mode():
        for batch in args.batches:
            image = list(images[:batch].to(device))

            def run(image=image):
                model(image)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            times = timed(run, args.steps, warmup=2)
            result[f"batch_{batch}"] = {"images_per_s": batch / times["median"], "time": times}
    return result


def collectives(args) -> dict:
    import jax

    sys.path.insert(0, str(REPO))
    from fcos_jax.config import load_config
    from fcos_jax.parallel import sharding
    from fcos_jax.training import communication

    mesh = sharding.make_mesh(jax.local_devices())
    config = load_config(R50_GN)
    config.train.batch_size = config.test.batch_size = mesh.size
    hw = (args.height, args.width)
    return {
        "devices": mesh.size,
        "params": communication.parameter_bytes(config),
        "train": communication.report(communication.train_step_hlo(config, mesh, hw)),
        "predict": communication.report(communication.predict_step_hlo(config, mesh, hw)),
    }


WORKERS = {
    "jax_train": jax_train,
    "torch_train": torch_train,
    "jax_infer": jax_infer,
    "torch_infer": torch_infer,
    "collectives": collectives,
}


# --------------------------------------------------------------------------------------------
# Orchestration


def _worker(name: str, args, *extra: str, env: dict | None = None) -> dict:
    flags = [
        "--height", str(args.height), "--width", str(args.width), "--batch", str(args.batch),
        "--steps", str(args.steps), "--batches", ",".join(map(str, args.batches)), *extra,
    ]  # fmt: skip
    # JAX must not take most of the device's memory in processes that share it with torch.
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", **(env or {})}
    return run_worker(__file__, name, flags, env)


def _parity(weights: Path, image: Path, scale: tuple[int, int]) -> dict:
    """compare's verdict and its worst per-level line, at the highest matmul precision."""
    command = [
        sys.executable, "-m", "fcos_jax.compare", "--format=torchvision",
        f"--config={TORCHVISION}", f"--config.preprocess.scale={scale}",
        f"--input={weights}", str(image),
    ]  # fmt: skip
    env = {
        **os.environ,
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"compare failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return {"ok": proc.returncode == 0, "summary": lines[-1] if lines else "", "output": lines}


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "-"


def _memory(gib: float | None, rss: float) -> str:
    return f"{gib:.2f} GiB device" if gib is not None else f"{rss:.2f} GiB RSS"


def print_table(results: dict, args) -> None:
    rows = [("check", "ours", "torchvision", "ours / torchvision")]
    parity = results["parity"]
    rows.append(("parity (highest precision)", "ok" if parity["ok"] else "FAILED", "", ""))
    for dtype, peer in (("float32", "float32"), ("bfloat16", "bfloat16 autocast")):
        ours, theirs = results[f"jax_train_{dtype}"], results[f"torch_train_{dtype}"]
        rows.append(
            (
                f"train step {dtype} (torch {peer}), {args.height}x{args.width}, "
                f"{args.batch}/device",
                f"{ours['images_per_s']:.2f} img/s, "
                f"{_memory(ours['peak_device_gib'], ours['max_rss_gib'])}",
                f"{theirs['images_per_s']:.2f} img/s, "
                f"{_memory(theirs['peak_device_gib'], theirs['max_rss_gib'])}",
                _ratio(ours["images_per_s"], theirs["images_per_s"]),
            )
        )
    for batch in args.batches:
        ours = results["jax_infer"][f"batch_{batch}"]["images_per_s"]
        theirs = results["torch_infer"][f"batch_{batch}"]["images_per_s"]
        rows.append(
            (f"inference batch {batch}", f"{ours:.2f} img/s", f"{theirs:.2f} img/s",
             _ratio(ours, theirs))
        )  # fmt: skip
    comm = results["collectives"]
    train, predict = comm["train"], comm["predict"]
    rows.append(
        (
            f"train step collectives, {comm['devices']} devices",
            f"{train.get('all-reduce', 0)} all-reduce, {train.get('all-reduce bytes', 0)} bytes "
            f"for {comm['params']['trainable']} trainable; {train.get('in loops', 0)} in loops",
            "",
            "",
        )
    )
    kinds = {k: v for k, v in predict.items() if not k.endswith("bytes") and k != "in loops"}
    rows.append(
        (
            f"predict step collectives, {comm['devices']} devices",
            f"{kinds or 'none'}; {predict.get('in loops', 0)} in loops",
            "",
            "",
        )
    )
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    if not parity["ok"]:
        print("\nparity output:\n" + "\n".join(parity["output"][-20:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (CPU, the test)")
    parser.add_argument("--json", default="", help="also write every result to this file")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--height", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.batches = [int(b) for b in args.batches.split(",")]
    if answer_as_worker(args, WORKERS):
        return
    height, width, batch, batches, steps = SIZES["tiny" if args.tiny else "full"]
    args.height, args.width, args.batch, args.batches, args.steps = (
        height, width, batch, batches, steps
    )  # fmt: skip
    import cv2

    sys.path.insert(0, str(REPO))
    from fcos_jax.testing.images import natural_image

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fcos_accelerator_check_") as tmp:
        weights, checkpoint, images = make_inputs(Path(tmp), height, width, max(batches))
        image_file = Path(tmp) / "image.png"
        cv2.imwrite(str(image_file), natural_image(height, width, seed=0)[:, :, ::-1])
        results = {"parity": _parity(weights, image_file, (width, height))}
        for dtype in ("float32", "bfloat16"):
            for side in ("jax", "torch"):
                results[f"{side}_train_{dtype}"] = _worker(f"{side}_train", args, "--dtype", dtype)
        paths = ["--weights", str(weights), "--checkpoint", str(checkpoint), "--input", str(images)]
        results["jax_infer"] = _worker("jax_infer", args, *paths)
        results["torch_infer"] = _worker("torch_infer", args, *paths)
        results["collectives"] = _worker("collectives", args)
    device = results["jax_infer"]["device"]
    print(
        f"accelerator check: {device} x {results['jax_infer']['devices']} (JAX), torch on "
        f"{results['torch_train_float32']['device']}; host {cpu_model()}; "
        f"{time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s\n"
    )
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if not results["parity"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
