"""Time to accuracy of `configs/custom_coco.py` on COCO-format folders it has never seen.

Writes a folder the way a user's data arrives (an instances JSON and an image directory per
split: 300-480 px images, 4 classes of simple shapes on textured backgrounds, a share of
grayscale PNGs among the JPEGs, crowd boxes over clusters, images without objects), then runs
`train.py --config configs/custom_coco.py` with only the four paths given, in a fresh workdir and
data_dir, and reports the wall time (folder preparation, compilation and the final evaluation
included) and the final AP table.

  .venv/bin/python benchmarks/custom_coco_time_to_ap.py --style polygons --seed 1
  .venv/bin/python benchmarks/custom_coco_time_to_ap.py --style outlines --seed 2 \
      -- --config.train.num_steps=1200   # anything after -- goes to train.py

Two generators with their own class sets and drawing (neither is the demo's shapes dataset):
  polygons  star, hexagon, ring, arrow: filled, rotated, on noise/stripes/checker/gradient
  outlines  square, circle, triangle, plus: thick outlines or filled halves, blurred, noisier
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = {
    "polygons": ("star", "hexagon", "ring", "arrow"),
    "outlines": ("square", "circle", "triangle", "plus"),
}


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """[h, w, 3] float32 0-255: one of four textures."""
    kind = rng.integers(4)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 215, 3).astype(np.float32)
    if kind == 0:  # smooth noise
        coarse = rng.uniform(-60, 60, (h // 24 + 2, w // 24 + 2, 3)).astype(np.float32)
        tex = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind == 1:  # stripes
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
        wave = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)
        tex = wave[..., None] * rng.uniform(10, 45, 3).astype(np.float32)
    elif kind == 2:  # checker
        cell = int(rng.integers(8, 40))
        checker = ((xs // cell + ys // cell) % 2) * 2 - 1
        tex = checker[..., None] * rng.uniform(8, 35, 3).astype(np.float32)
    else:  # gradient
        tex = (xs / w - 0.5)[..., None] * rng.uniform(-90, 90, 3).astype(np.float32)
        tex += (ys / h - 0.5)[..., None] * rng.uniform(-90, 90, 3).astype(np.float32)
    return base + tex + rng.normal(0, rng.uniform(2, 12), (h, w, 3)).astype(np.float32)


def _polygon(kind: int, cx: float, cy: float, r: float, angle: float) -> list[np.ndarray]:
    """Outlines (int32 point arrays) of one polygons-style shape; ring = outer + hole."""

    def ring_points(n, radii):
        t = angle + np.arange(n) * 2 * np.pi / n
        rr = np.resize(np.asarray(radii, np.float32), n)
        return np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], -1).round().astype(np.int32)

    if kind == 0:
        return [ring_points(10, (r, 0.45 * r))]
    if kind == 1:
        return [ring_points(6, (r,))]
    if kind == 2:
        return [ring_points(40, (r,)), ring_points(40, (0.55 * r,))]
    shaft = np.array([(-r, -0.25 * r), (0.1 * r, -0.25 * r), (0.1 * r, -0.6 * r), (r, 0)])
    pts = np.concatenate([shaft, shaft[::-1][1:] * (1, -1)])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return [(pts @ rot.T + (cx, cy)).round().astype(np.int32)]


def _draw(rng, canvas, style, kind, cx, cy, r, color):
    """Draws one object; returns its box (x, y, w, h) from the pixels it changed."""
    mask = np.zeros(canvas.shape[:2], np.uint8)
    angle = float(rng.uniform(0, 2 * np.pi))
    if style == "polygons":
        outlines = _polygon(kind, cx, cy, r, angle)
        cv2.fillPoly(mask, outlines[:1], 255)
        if len(outlines) > 1:
            cv2.fillPoly(mask, outlines[1:], 0)
    else:
        thick = max(2, int(r * rng.uniform(0.12, 0.3)))
        fill = -1 if rng.random() < 0.5 else thick
        c, ri = (int(cx), int(cy)), int(r)
        if kind == 0:
            cv2.rectangle(mask, (c[0] - ri, c[1] - ri), (c[0] + ri, c[1] + ri), 255, fill)
        elif kind == 1:
            cv2.circle(mask, c, ri, 255, fill)
        elif kind == 2:
            t = angle + np.arange(3) * 2 * np.pi / 3
            pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], -1).round().astype(np.int32)
            if fill < 0:
                cv2.fillPoly(mask, [pts], 255)
            else:
                cv2.polylines(mask, [pts], True, 255, thick)
        else:
            bar = max(2, int(r * 0.35))
            cv2.rectangle(mask, (c[0] - ri, c[1] - bar), (c[0] + ri, c[1] + bar), 255, -1)
            cv2.rectangle(mask, (c[0] - bar, c[1] - ri), (c[0] + bar, c[1] + ri), 255, -1)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    canvas[mask > 0] = color
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def write_split(root: Path, split: str, n: int, style: str, seed: int) -> tuple[Path, Path]:
    """`root/<split>/` images and `root/annotations/<split>.json`."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split]])
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(300, 481, 2))
        canvas = _background(rng, h, w)
        count = 0 if rng.random() < 0.06 else int(rng.integers(1, 7))
        anns = []
        for _ in range(count):
            r = float(np.exp(rng.uniform(np.log(9), np.log(min(h, w) / 3.2))))
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            local = canvas[int(cy), int(cx)]
            color = rng.uniform(0, 255, 3)
            while np.abs(color - local).sum() < 150:
                color = rng.uniform(0, 255, 3)
            kind = int(rng.integers(4))
            box = _draw(rng, canvas, style, kind, cx, cy, r, color)
            if box:
                anns.append({"category_id": kind + 1, "bbox": box, "iscrowd": 0})
        if count and rng.random() < 0.1:  # a crowd: a cluster of small shapes, one box
            kind, x0, y0 = int(rng.integers(4)), rng.uniform(0, w - 80), rng.uniform(0, h - 80)
            color = rng.uniform(0, 255, 3)
            boxes = [
                _draw(
                    rng,
                    canvas,
                    style,
                    kind,
                    x0 + rng.uniform(8, 72),
                    y0 + rng.uniform(8, 72),
                    6.0,
                    color,
                )
                for _ in range(6)
            ]
            boxes = np.asarray([b for b in boxes if b])
            if len(boxes):
                x1, y1 = boxes[:, 0].min(), boxes[:, 1].min()
                x2, y2 = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
                anns.append(
                    {"category_id": kind + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 1}
                )
        if style == "outlines":
            canvas = cv2.GaussianBlur(canvas, (3, 3), 0)
        image = np.clip(canvas, 0, 255).astype(np.uint8)
        if rng.random() < 0.15:  # grayscale PNG
            name = f"{i:05d}.png"
            cv2.imwrite(str(image_dir / name), cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
        else:
            name = f"{i:05d}.jpg"
            cv2.imwrite(str(image_dir / name), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        image_id = 1000 + i
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for ann in anns:
            x, y, bw, bh = ann["bbox"]
            annotations.append(
                dict(ann, id=len(annotations) + 1, image_id=image_id, area=float(bw * bh))
            )
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES[style])]
    json_path = root / "annotations" / f"{split}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return json_path, image_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", choices=sorted(CLASSES), default="polygons")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--num_train", type=int, default=400)
    parser.add_argument("--num_val", type=int, default=80)
    parser.add_argument("--root", default="/tmp/fcos_custom_coco", help="folders and workdirs")
    parser.add_argument("train_args", nargs="*", help="extra train.py flags (after --)")
    args = parser.parse_args()
    tag = f"{args.style}-seed{args.seed}-{args.num_train}-{args.num_val}"
    folder = Path(args.root) / tag
    if not (folder / "annotations" / "val.json").is_file():
        write_split(folder, "train", args.num_train, args.style, args.seed)
        write_split(folder, "val", args.num_val, args.style, args.seed)
    run = Path(args.root) / f"run-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [
        sys.executable,
        "train.py",
        "--config=configs/custom_coco.py",
        f"--workdir={run / 'workdir'}",
        f"--config.data.data_dir={run / 'data'}",
        f"--config.data.folder.train_json={folder / 'annotations' / 'train.json'}",
        f"--config.data.folder.train_images={folder / 'train'}",
        f"--config.data.folder.val_json={folder / 'annotations' / 'val.json'}",
        f"--config.data.folder.val_images={folder / 'val'}",
        "--config.train.progress_bar=False",
        *args.train_args,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (run / "train.log").parent.mkdir(parents=True, exist_ok=True)
    (run / "train.log").write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    if result.returncode != 0:
        sys.exit(f"train.py failed ({result.returncode}); log: {run / 'train.log'}")
    stats = re.findall(r"Average Precision .*?= (-?[0-9.]+)", result.stdout)
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(
        json.dumps(
            {
                "folder": str(folder),
                "train_args": args.train_args,
                "wall_s": round(wall, 1),
                "AP": float(stats[-6]) if len(stats) >= 6 else None,
                "AP50": float(stats[-5]) if len(stats) >= 6 else None,
                "loadavg_after": load,
                "log": str(run / "train.log"),
            }
        )
    )


if __name__ == "__main__":
    main()
