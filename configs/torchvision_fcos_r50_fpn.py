"""torchvision `fcos_resnet50_fpn` (COCO_V1 weights: 39.2 box AP), run and trained as torchvision.

  python -m fcos_jax.convert --format torchvision --config configs/torchvision_fcos_r50_fpn.py \
      --input fcos_resnet50_fpn_coco-99b0c9b7.pth --output ckpt/torchvision_fcos_r50_fpn
  python -m fcos_jax.predict --config configs/torchvision_fcos_r50_fpn.py \
      --checkpoint ckpt/torchvision_fcos_r50_fpn image.jpg
  python -m fcos_jax.compare --format torchvision --config configs/torchvision_fcos_r50_fpn.py \
      --input fcos_resnet50_fpn_coco-99b0c9b7.pth image.jpg
  python -m fcos_jax.convert --format backbone --config configs/torchvision_fcos_r50_fpn.py \
      --input resnet50-0676ba61.pth --output ckpt/resnet50_imagenet
  python train.py --config configs/torchvision_fcos_r50_fpn.py --workdir workdirs/tv_fcos \
      --config.init_from=ckpt/resnet50_imagenet --config.data.data_dir=/data/tfds

Training follows torchvision's reference recipe for this model (references/detection/README.md:
`train.py --model fcos_resnet50_fpn --epochs 26 --lr-steps 16 22 --aspect-ratio-group-factor 3
--lr 0.01 --amp --weights-backbone ResNet50_Weights.IMAGENET1K_V1` on 8 GPUs x 2 images) and its
defaults (train.py, engine.py, fcos.py):
  * SGD momentum 0.9, lr 0.01 per 16 images, weight decay 1e-4 on every trainable parameter
    (biases and GroupNorm included), no learning-rate multiplier;
  * x0.1 after epochs 16 and 22 of 26; warm-up: LinearLR from 1/1000 over
    min(1000, iterations per epoch - 1) iterations of the first epoch;
  * `trainable_backbone_layers=3` with ImageNet weights: stem and layer1 frozen, FrozenBatchNorm2d
    (statistics and affine fixed) everywhere in the backbone;
  * horizontal flip (p = 0.5) as the only augmentation, one scale (800, max 1333), images without
    a usable box dropped, crowd boxes dropped;
  * aspect-ratio groups (factor 3): batches of similar aspect; here the static-shape equivalent,
    six canvases (three aspect bins per orientation) that batches are grouped by.
  * `--amp` (float16 autocast on GPU) has no float32 equivalent: this row trains in float32.
"""

from fcos_jax.config import base as config_base


def get_config():
    c = config_base.get_base_config()
    c.name = "torchvision_fcos_r50_fpn"
    b = c.model.backbone
    b.style = "pytorch"
    b.norm_trainable = False  # FrozenBatchNorm2d: statistics and affine are buffers
    b.frozen_stages = 1  # trainable_backbone_layers=3: layer2..layer4 train
    h = c.model.head
    h.num_classes = 91  # channel = COCO category id; 0 and unused ids never fire on COCO
    h.conv_bias = True
    h.centerness_on_reg = True
    h.regression = "relu_stride"
    c.data.classes = "coco91"
    c.data.min_image_side = 0  # torchvision filters images by their boxes only
    # Aspect-ratio groups: (h, w) canvases for w/h up to 1.28, 1.6 and beyond, and portrait.
    c.data.canvases = ((800, 1024), (800, 1280), (800, 1344), (1024, 800), (1280, 800), (1344, 800))

    p = c.preprocess
    p.resize = "torchvision"  # normalise, then float bilinear resize to floor(side * scale)
    p.unit_range = True
    p.mean, p.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    p.to_rgb = True
    p.scale_factor = "per_axis"
    c.legacy_plus_one = False

    t = c.test
    t.postprocess = "torchvision"
    t.score_thr, t.nms_iou = 0.2, 0.6

    c.targets.assigner = "torchvision"
    c.targets.center_sampling = True
    c.loss.bbox_loss = "giou"
    c.loss.normalizer = "torchvision"
    o = c.optim
    o.lr_steps = (16, 22)
    o.base_lr, o.reference_batch, o.momentum, o.weight_decay = 0.01, 16, 0.9, 1e-4
    o.bias_lr_mult, o.bias_decay_mult, o.norm_decay_mult = 1.0, 1.0, 1.0
    o.warmup, o.warmup_iters, o.warmup_ratio = "torchvision", 1000, 1.0 / 1000
    o.grad_clip_norm = 0.0
    c.augment.multiscale, c.augment.flip_ratio = ((1333, 800),), 0.5
    c.train.epochs = 26
    return c
