"""The embedded default: a small FCOS trained from scratch on the built-in shapes dataset.

  make demo    # = the two commands below, data under .data/
  python train.py --config configs/shapes.py --workdir workdirs/shapes
  python eval.py --config configs/shapes.py --checkpoint workdirs/shapes

The demo starts from no pretrained weights, so the backbone's BatchNorm normalises with batch
statistics (docs/architecture.md#conventions) and every stage trains. The model is narrow
(ResNet-18 at quarter width, a 32-channel FPN and a 2-conv head) and the images small (256-320
px, resized to at most 256), so the whole run takes minutes on a CPU. It uses the improved
recipe of later mmdetection (centre sampling, GIoU, norm_on_bbox, centerness on the reg branch,
gradient clipping) and `mmdet_v3` post-processing.

The optimizer is AdamW (lr 2e-3 per 8 images, weight decay 0.05), not the model-zoo recipe's SGD:
from scratch and in under 1000 steps, SGD and a smaller AdamW lr left the classifier unsure
between shapes. Inputs of at most 256 px cost a little AP against 320 px for about two thirds of
the step time; `--config.preprocess.scale='(320, 320)' --config.augment.multiscale='((320, 320),)'`
trains at 320. The 800 steps keep a margin above AP50 0.9. The runs behind these choices:
docs/benchmarks.md#behind-the-code.
"""

from fcos_jax.config import base as config_base


def get_config():
    c = config_base.get_base_config()
    c.name = "shapes"

    b = c.model.backbone
    b.depth, b.style, b.stem_width = 18, "pytorch", 16
    b.norm, b.norm_trainable, b.frozen_stages = "batch_stats_bn", True, -1
    c.model.fpn.out_channels = 32
    h = c.model.head
    h.num_classes, h.feat_channels, h.stacked_convs, h.gn_groups = 4, 32, 2, 8
    h.centerness_on_reg, h.regression, h.conv_bias = True, "scale_relu_stride", True

    p = c.preprocess
    p.scale = (256, 256)
    p.mean, p.std, p.to_rgb = config_base.IMAGENET_MEAN_RGB, config_base.IMAGENET_STD_RGB, True
    p.scale_factor = "per_axis"
    c.legacy_plus_one = False

    c.test.postprocess, c.test.nms_iou, c.test.batch_size = "mmdet_v3", 0.6, 8

    d = c.data
    d.source, d.classes, d.data_dir = "shapes", "shapes", ".data"
    d.eval_pad = "canvas"  # one compiled evaluation program instead of one per padded size
    # One decoding thread keeps far ahead of the step on these small images; more (AUTOTUNE) only
    # compete with XLA for the CPU cores (docs/benchmarks.md#behind-the-code).
    d.num_parallel_calls = 1
    d.max_boxes = 16

    c.targets.center_sampling, c.targets.norm_on_bbox = True, True
    c.loss.bbox_loss = "giou"
    o = c.optim
    o.optimizer, o.reference_batch, o.base_lr = "adamw", 8, 2e-3
    o.weight_decay, o.bias_lr_mult = 0.05, 1.0
    o.warmup, o.warmup_iters, o.warmup_ratio = "linear", 100, 0.1
    o.grad_clip_norm = 35.0
    o.lr_steps = (605, 726)
    c.augment.multiscale = ((256, 256),)
    t = c.train
    t.batch_size = 8
    t.schedule_unit, t.epochs, t.num_steps = "steps", 0, 800
    t.log_every, t.checkpoint_every, t.keep_checkpoints = 25, 250, 2
    return c
