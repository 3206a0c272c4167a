"""torchvision `fcos_resnet50_fpn` (COCO_V1 weights: 39.2 box AP), run as torchvision runs it.

  python -m fcos_jax.convert --format torchvision --config configs/torchvision_fcos_r50_fpn.py \
      --input fcos_resnet50_fpn_coco-99b0c9b7.pth --output ckpt/torchvision_fcos_r50_fpn
  python -m fcos_jax.predict --config configs/torchvision_fcos_r50_fpn.py \
      --checkpoint ckpt/torchvision_fcos_r50_fpn image.jpg
  python -m fcos_jax.compare --format torchvision --config configs/torchvision_fcos_r50_fpn.py \
      --input fcos_resnet50_fpn_coco-99b0c9b7.pth image.jpg
"""

from fcos_jax import config_base


def get_config():
    c = config_base.get_base_config()
    c.name = "torchvision_fcos_r50_fpn"
    b = c.model.backbone
    b.style = "pytorch"
    b.norm_trainable = True  # FrozenBatchNorm2d stats; trainable_layers=3 as the pretrained builder
    h = c.model.head
    h.num_classes = 91  # channel = COCO category id; 0 and unused ids never fire on COCO
    h.conv_bias = True
    h.centerness_on_reg = True
    h.regression = "relu_stride"
    c.data.classes = "coco91"

    p = c.preprocess
    p.resize = "torchvision"  # normalise, then float bilinear resize to floor(side * scale)
    p.unit_range = True
    p.mean, p.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    p.to_rgb = True
    c.legacy_plus_one = False

    t = c.test
    t.postprocess = "torchvision"
    t.score_thr, t.nms_iou = 0.2, 0.6

    tr = c.train
    tr.assigner = "torchvision"
    tr.center_sampling = True
    tr.bbox_loss = "giou"
    tr.normalizer = "torchvision"
    tr.epochs, tr.lr_steps = 26, (16, 22)
    return c
