"""The improved FCOS recipe of later mmdetection (v2.2+ `fcos_center-normbbox-centeronreg-giou_r50_
caffe_fpn_gn-head_1x_coco`, 38.7 box AP there): centre sampling, GIoU, targets normalised by the
stride, centerness on the reg branch, tower conv bias, gradient clipping 35, linear warmup, no +1
pixel convention and `mmdet_v3` post-processing. Backbone: the Detectron2 caffe R-50 (BGR, mean
103.53/116.28/123.675, std 1).

  python -m fcos_jax.convert --format backbone --config configs/fcos_center_normbbox_centeronreg_giou_r50_caffe_fpn_gn_1x.py --input resnet50_caffe.pth --output ckpt/r50_caffe
  python train.py --config configs/fcos_center_normbbox_centeronreg_giou_r50_caffe_fpn_gn_1x.py --workdir workdirs/fcos_improved --config.init_from=ckpt/r50_caffe
  python eval.py --config configs/fcos_center_normbbox_centeronreg_giou_r50_caffe_fpn_gn_1x.py --checkpoint workdirs/fcos_improved
"""

from fcos_jax.config import base as config_base


def get_config():
    c = config_base.get_base_config()
    c.name = "fcos_center_normbbox_centeronreg_giou_r50_caffe_fpn_gn_1x"
    h = c.model.head
    h.conv_bias = True
    h.centerness_on_reg = True
    h.regression = "scale_relu_stride"  # norm_on_bbox: relu(scale * x) * stride

    c.preprocess.mean = (103.53, 116.28, 123.675)  # detectron2/resnet50_caffe, BGR
    c.preprocess.scale_factor = "per_axis"  # mmdet v2+ rescales each axis
    c.legacy_plus_one = False

    c.test.postprocess = "mmdet_v3"
    c.test.nms_iou = 0.6

    c.targets.center_sampling = True
    c.targets.norm_on_bbox = True
    c.loss.bbox_loss = "giou"
    c.loss.normalizer = "global"
    c.optim.grad_clip_norm = 35.0
    c.optim.warmup = "linear"
    return c
