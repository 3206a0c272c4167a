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
images: a few hundred images of 300-480 px with a handful of classes reach AP50 >= 0.8 in about
15 minutes on a 2-core CPU (README, "Train on your own data"). Scale `train.num_steps` and
`train.lr_steps` together for longer runs.
"""

from pathlib import Path

from fcos_jax.config_io import load_config


def get_config():
    c = load_config(Path(__file__).with_name("shapes.py"))
    c.name = "custom_coco"
    c.model.head.num_classes = 0  # as many as the training JSON's categories
    d = c.data
    d.source, d.classes, d.data_dir = "coco_folder", "dataset", ".data"
    d.folder.name = "custom"
    d.min_image_side = 1
    c.train.max_boxes = 32
    return c
