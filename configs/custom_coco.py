"""Your own COCO-format data: the demo's small from-scratch FCOS on any instances JSON + images.

  python train.py --config configs/custom_coco.py --workdir workdirs/mydata \
      --config.data.folder.train_json=/data/mydata/annotations/train.json \
      --config.data.folder.train_images=/data/mydata/train \
      --config.data.folder.val_json=/data/mydata/annotations/val.json \
      --config.data.folder.val_images=/data/mydata/val
  python eval.py --config configs/custom_coco.py --checkpoint workdirs/mydata \
      --config.data.folder.val_json=/data/mydata/annotations/val.json \
      --config.data.folder.val_images=/data/mydata/val
  python -m fcos_jax.predict --config configs/custom_coco.py --checkpoint workdirs/mydata img.jpg

The number of classes and their names come from the training JSON's `categories`
(`model.head.num_classes = 0`, `data.classes = 'dataset'`) and travel with every checkpoint, so
evaluation and prediction print and draw your class names without the dataset. The folder is
checked and prepared once under `data.data_dir` (bad annotations are fixed and counted, broken
images skipped with a warning naming the file). The schedule is in steps, whatever the number of
images (what it reaches on folders it never saw, and in what time:
docs/benchmarks.md#behind-the-code, `benchmarks/custom_coco_time_to_ap.py`). Scale
`train.num_steps` and `optim.lr_steps` together for longer or shorter runs.
"""

from pathlib import Path

from fcos_jax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("shapes.py"))
    c.name = "custom_coco"
    c.model.head.num_classes = 0  # as many as the training JSON's categories
    d = c.data
    d.source, d.classes, d.data_dir = "coco_folder", "dataset", ".data"
    d.folder.name = "custom"
    d.min_image_side = 1
    d.max_boxes = 32
    # A few hundred images: 2.5x the demo's steps, a higher AdamW lr, and scale jitter (each image
    # resized to fit a random square of 256-320 px, the canvas staying 320) against overfitting
    # (the runs that chose them: docs/benchmarks.md#behind-the-code).
    c.optim.base_lr, c.optim.lr_steps = 3e-3, (1512, 1815)
    c.train.num_steps = 2000
    c.augment.multiscale, c.augment.multiscale_mode = ((256, 256), (320, 320)), "range"
    c.preprocess.scale = (320, 320)  # evaluation (the demo's is 256)
    return c
