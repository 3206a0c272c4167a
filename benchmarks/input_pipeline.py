"""Throughput of the input pipelines at the model-zoo scale 1333x800.

  .venv/bin/python benchmarks/input_pipeline.py                # 1333x800, global batch 16
  .venv/bin/python benchmarks/input_pipeline.py --scale 320,320 --images 256

Writes COCO-sized JPEGs (640x480 and 480x640, shapes on textured backgrounds, quality 90) as a
COCO-format folder in a temporary directory, prepares it with the TFDS builder, then times the
training pipeline (TF decode, resize, flip, normalise, pad into the canvas, boxes) and the
evaluation pipeline (predict's cv2 preprocessing) of the R-50 caffe config: images per second
after the first batch, one process, all cores (`data.num_parallel_calls` = AUTOTUNE), and the CPU
seconds per image (all threads), which do not depend on what else runs on the machine.

Compare with the training step on the same cores (`benchmarks/train_step.py`;
docs/benchmarks.md#behind-the-code): the pipeline must stay well above the images per second a
step consumes while sharing the cores.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from fcos_jax.config import base as config_base
from fcos_jax.config import classes  # noqa: E402
from fcos_jax.data import pipeline, shapes  # noqa: E402


def write_images(root: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """COCO-sized JPEGs with their shape boxes; returns (JSON, image dir)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    images, anns = [], []
    for i in range(count):
        h, w = (480, 640) if i % 4 else (640, 480)
        image, objects = shapes.render_image(np.random.default_rng([seed, i]), h, w)
        name = f"{i:06d}.jpg"
        cv2.imwrite(str(image_dir / name), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for kind, bbox, area in objects:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": kind + 1,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(classes.SHAPES_NAMES)]
    json_path = root / "instances.json"
    content = {"images": images, "annotations": anns, "categories": categories}
    json_path.write_text(json.dumps(content))
    return json_path, image_dir


def time_batches(iterator, batches: int) -> tuple[float, float, float, tuple]:
    """(seconds for the first batch, wall seconds per later batch, CPU seconds of this process,
    all threads, per later batch, image shape of the last batch)."""
    start = time.perf_counter()
    batch = next(iterator)
    first = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(iterator)
    wall = (time.perf_counter() - start) / batches
    return first, wall, (time.process_time() - cpu) / batches, batch["image"].shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="images written")
    parser.add_argument("--batch", type=int, default=16, help="global (= local) batch size")
    parser.add_argument("--batches", type=int, default=6, help="timed batches after the first")
    parser.add_argument("--scale", default="1333,800", help="long,short")
    parser.add_argument("--num_parallel_calls", type=int, default=-1)
    args = parser.parse_args()
    scale = tuple(int(v) for v in args.scale.split(","))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        json_path, image_dir = write_images(root / "src", args.images)
        c = config_base.get_base_config()
        c.data.source, c.data.classes = "coco_folder", "dataset"
        c.data.data_dir = str(root / "tfds")
        c.data.folder.name = "bench"
        c.data.folder.train_json, c.data.folder.train_images = str(json_path), str(image_dir)
        c.data.folder.val_json, c.data.folder.val_images = str(json_path), str(image_dir)
        c.data.num_parallel_calls = args.num_parallel_calls
        c.model.head.num_classes = len(classes.SHAPES_NAMES)
        c.preprocess.scale = scale
        c.augment.multiscale = (scale,)
        c.train.batch_size = c.test.batch_size = args.batch

        start = time.perf_counter()
        train = pipeline.TrainPipeline(c, process_index=0, process_count=1)
        setup = time.perf_counter() - start
        timings = {"train (TF ops)": time_batches(train, args.batches)}
        evaluation = pipeline.EvalPipeline(c, process_index=0, process_count=1)
        eval_batches = min(args.batches, len(evaluation) - 1)
        timings["eval (predict's cv2)"] = time_batches(iter(evaluation), eval_batches)

    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"prepare + index + plan: {setup:.1f} s for {args.images} images")
    print("| pipeline | batch shape | first batch (s) | s / batch | images / s | CPU s / image |")
    print("|---|---|---|---|---|---|")
    for name, (first, wall, cpu, shape) in timings.items():
        row = f"| {name} | {shape} | {first:.2f} | {wall:.2f} | {shape[0] / wall:.1f} |"
        print(f"{row} {cpu / shape[0]:.3f} |")


if __name__ == "__main__":
    main()
