"""The settings every FCOS config shares; each file in `configs/` changes only what its row changes.

Field groups, each read by the modules named:
  model       architecture (backbone, FPN, head) and compute dtype: models/.
  preprocess  decoding, resizing, normalisation, padding and the scale-factor convention of
              input images: data/preprocess.py, data/.
  legacy_plus_one  the +1 pixel convention of the data, targets, losses and COCO results.
  test        post-processing mode, its thresholds, the evaluation batch: detection/postprocess.py,
              evaluation/evaluator.py, inference.py.
  data        dataset source, class list, canvases and ground-truth padding: data/.
  targets     assignment of points to boxes (assigner, ranges, centre sampling):
              detection/targets.py.
  loss        box loss, normalisers and focal loss: detection/losses.py.
  optim       optimizer, parameter groups, learning-rate schedule and clipping: training/optim.py.
  augment     training scales and flips: data/epoch_plan.py.
  train       the loop: batch, run length, cadence of logs, checkpoints and evaluations:
              training/trainer.py.
  init_from, seed, name

`fcos_jax/config/check.py` refuses unknown fields and conventions that disagree (`check`).
"""

import ml_collections

# mmdet v1 caffe backbones: BGR 0-255 minus the Detectron mean, std 1.
CAFFE_MEAN_BGR = (102.9801, 115.9465, 122.7717)
# ImageNet statistics in RGB order on a 0-255 scale (X-101, pytorch-style backbones).
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)


def get_base_config() -> ml_collections.ConfigDict:
    """mmdet v1 FCOS R-50 caffe FPN GN 1x (the model zoo's `fcos_r50_caffe_fpn_gn_1x_4gpu`)."""
    c = ml_collections.ConfigDict()
    c.name = "fcos_r50_caffe_fpn_gn_1x"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # compute dtype: float32 or bfloat16; parameters stay float32.
    c.model.backbone = ml_collections.ConfigDict(
        dict(
            depth=50,  # 18, 34 (basic blocks), 50, 101 (bottlenecks)
            style="caffe",  # caffe: stride on the 1x1 conv1; pytorch: stride on the 3x3 conv2
            groups=1,  # ResNeXt cardinality (64 for X-101-64x4d)
            base_width=64,  # ResNeXt width per group (4 for X-101-64x4d); 64 = plain ResNet
            stem_width=64,
            norm="frozen_bn",  # frozen_bn: pretrained running stats; batch_stats_bn: batch stats
            norm_trainable=False,  # BN affine trains (not for caffe backbones: docs/modes.md §2.2)
            frozen_stages=1,  # mmdet: -1 none, 0 the stem, N the stem and stages 1..N do not train
        )
    )
    c.model.fpn = ml_collections.ConfigDict(dict(out_channels=256))
    c.model.head = ml_collections.ConfigDict(
        dict(
            num_classes=80,
            feat_channels=256,
            stacked_convs=4,
            norm="gn",  # gn or none
            gn_groups=32,
            conv_bias=False,  # tower conv bias: mmdet v1 has none with GN; torchvision has one
            centerness_on_reg=False,  # mmdet v1: centerness on the cls tower
            regression="exp_scale",  # exp_scale: exp(scale_l * x); relu_stride: relu(x) * stride
            strides=(8, 16, 32, 64, 128),
            prior_prob=0.01,
        )
    )

    c.preprocess = ml_collections.ConfigDict(
        dict(
            resize="mmdet",  # mmdet: cv2 on uint8, int(x+0.5); torchvision: float bilinear, floor
            scale=(1333, 800),  # (long side max, short side)
            mean=CAFFE_MEAN_BGR,
            std=(1.0, 1.0, 1.0),
            to_rgb=False,  # False: the network sees BGR (caffe)
            unit_range=False,  # True: pixels / 255 before (x - mean) / std (torchvision)
            size_divisor=32,
            # How boxes map between original and resized pixels: single (one factor for both
            # axes, mmcv v1's scale_factor: test.postprocess mmdet_v1) or per_axis (new_h / h,
            # new_w / w: mmdet_v3, torchvision). Checked against test.postprocess.
            scale_factor="single",
        )
    )
    # mmdet v1 pixel convention (docs/modes.md §2.6): widths are x2 - x1 + 1 in the data, the
    # targets, the losses and the COCO results; test.postprocess mmdet_v1 needs True, the other
    # modes and targets.assigner torchvision False (fcos_jax/config/check.py).
    c.legacy_plus_one = True

    c.test = ml_collections.ConfigDict(
        dict(
            postprocess="mmdet_v1",  # mmdet_v1, mmdet_v3 or torchvision (docs/modes.md)
            nms_pre=1000,
            score_thr=0.05,
            nms_iou=0.5,
            max_per_img=100,
            batch_size=1,
            # JAX persistent compilation cache for predict/eval ("" = off; JAX's own
            # JAX_COMPILATION_CACHE_DIR environment variable works too).
            compilation_cache_dir="",
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            # Channel -> (category id, name): coco (80 COCO classes), coco91 (torchvision's
            # id-indexed list), shapes (the built-in dataset) or dataset (the source's own list,
            # e.g. a COCO-format folder's categories sorted by id).
            classes="coco",
            # coco_tfds: TFDS `tfds_name` prepared under data_dir; coco_folder: an instances JSON
            # + image directory per split (`folder`); shapes: the built-in synthetic dataset.
            source="coco_tfds",
            data_dir="",  # TFDS data_dir of prepared datasets and index caches; "" = TFDS default
            tfds_name="coco/2017",
            train_split="train",
            val_split="validation",
            # coco_folder source: name of the prepared TFDS dataset and the files of each split.
            folder=dict(name="", train_json="", train_images="", val_json="", val_images=""),
            # shapes source (fcos_jax/data/shapes.py): written once per setting under data_dir.
            shapes=dict(seed=0, num_train=1000, num_val=200, min_side=256, max_side=320),
            # Training canvases (H, W), each a multiple of size_divisor; () = landscape and
            # portrait of the largest training scale. An image goes to the smallest that fits.
            canvases=(),
            max_boxes=100,  # ground-truth rows per image (training keeps the largest boxes)
            min_image_side=32,  # mmdet v1: training images with a shorter side are dropped
            # Evaluation padding: multiple (next multiple of size_divisor, exactly as predict) or
            # canvas (landscape and portrait of preprocess.scale: fewer compiles, outputs near
            # borders change; the canvases of exported artifacts).
            eval_pad="multiple",
            prefetch=2,  # batches prepared ahead of the training/eval loop
            num_parallel_calls=-1,  # images decoded in parallel; -1 = tf.data AUTOTUNE
        )
    )

    c.targets = ml_collections.ConfigDict(
        dict(
            assigner="mmdet",  # mmdet (docs/modes.md §2.8) or torchvision (§4.8)
            regress_ranges=((-1, 64), (64, 128), (128, 256), (256, 512), (512, 1e8)),
            center_sampling=False,
            center_sample_radius=1.5,
            norm_on_bbox=False,  # regression targets / stride (mmdet v2.2+), read by the loss too
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            bbox_loss="iou",  # iou (-log IoU) or giou (1 - GIoU)
            normalizer="global",  # global, v1 or torchvision
            focal_alpha=0.25,
            focal_gamma=2.0,
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            optimizer="sgd",  # sgd (torch.optim.SGD) or adamw (torch.optim.AdamW)
            base_lr=0.01,  # per reference_batch images, scaled linearly with train.batch_size
            reference_batch=16,
            lr_steps=(8, 11),  # lr x0.1 from each of these (in train.schedule_unit)
            momentum=0.9,  # sgd only
            adam_betas=(0.9, 0.999),  # adamw only
            adam_eps=1e-8,  # adamw only
            weight_decay=1e-4,
            bias_lr_mult=2.0,
            bias_decay_mult=0.0,
            norm_decay_mult=1.0,
            downsample_bn_bias_as_bias=False,  # mmdet v1 quirk: downsample.1.bias is a bias
            # constant / linear: mmcv's warm-up over warmup_iters; torchvision: linear, in the
            # first epoch only, over min(warmup_iters, steps_per_epoch - 1) (its references).
            warmup="constant",
            warmup_iters=500,
            warmup_ratio=1.0 / 3,
            grad_clip_norm=0.0,  # 0 disables; v2+ recipes use 35
        )
    )
    c.augment = ml_collections.ConfigDict(
        dict(
            multiscale=((1333, 800),),  # training scales (long side max, short side)
            multiscale_mode="value",  # value: one of the scales; range: sampled between two
            flip_ratio=0.5,
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            batch_size=16,  # global batch of an optimizer step
            accumulate_steps=1,  # micro-batches per step (same update, less memory)
            # The run's length and optim.lr_steps share one unit: 'epochs' (train.epochs of the
            # dataset at hand: the model-zoo recipes) or 'steps' (train.num_steps optimizer
            # steps, whatever the dataset's size).
            schedule_unit="epochs",
            epochs=12,
            num_steps=0,
            log_every=20,
            checkpoint_every=1000,
            keep_checkpoints=3,
            eval_every=0,  # evaluate every N steps (0: only at the end)
            eval_at_end=True,
            progress_bar=True,
        )
    )
    c.init_from = ""
    return c
