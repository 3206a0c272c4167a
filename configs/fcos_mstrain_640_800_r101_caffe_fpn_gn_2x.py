"""mmdet v1 FCOS R-101 caffe FPN GN, multi-scale 640/800, 2x: 40.8 box AP (mmdetection v1 model zoo).

python -m fcos_jax.convert --format mmdet --config configs/fcos_mstrain_640_800_r101_caffe_fpn_gn_2x.py --input fcos_mstrain_640_800_r101_caffe_fpn_gn_2x_4gpu_20190516-42e6f62d.pth --output ckpt/fcos_mstrain_640_800_r101_caffe_fpn_gn_2x
python -m fcos_jax.predict --config configs/fcos_mstrain_640_800_r101_caffe_fpn_gn_2x.py --checkpoint ckpt/fcos_mstrain_640_800_r101_caffe_fpn_gn_2x image.jpg
python eval.py --config configs/fcos_mstrain_640_800_r101_caffe_fpn_gn_2x.py --checkpoint ckpt/fcos_mstrain_640_800_r101_caffe_fpn_gn_2x
python train.py --config configs/fcos_mstrain_640_800_r101_caffe_fpn_gn_2x.py --workdir workdirs/fcos_mstrain_640_800_r101_caffe_fpn_gn_2x
"""

from fcos_jax.config import base as config_base


def get_config():
    c = config_base.get_base_config()
    c.name = "fcos_mstrain_640_800_r101_caffe_fpn_gn_2x"
    c.model.backbone.depth = 101
    c.train.epochs, c.optim.lr_steps = 24, (16, 22)
    c.augment.multiscale, c.augment.multiscale_mode = ((1333, 640), (1333, 800)), "value"
    return c
