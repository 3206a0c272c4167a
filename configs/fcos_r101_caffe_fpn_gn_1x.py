"""mmdet v1 FCOS R-101 caffe FPN GN, 1x: 39.1 box AP (mmdetection v1 model zoo).

python -m fcos_jax.convert --format mmdet --config configs/fcos_r101_caffe_fpn_gn_1x.py --input fcos_r101_caffe_fpn_gn_1x_4gpu_20190516-e4889733.pth --output ckpt/fcos_r101_caffe_fpn_gn_1x
python -m fcos_jax.predict --config configs/fcos_r101_caffe_fpn_gn_1x.py --checkpoint ckpt/fcos_r101_caffe_fpn_gn_1x image.jpg
python eval.py --config configs/fcos_r101_caffe_fpn_gn_1x.py --checkpoint ckpt/fcos_r101_caffe_fpn_gn_1x
python train.py --config configs/fcos_r101_caffe_fpn_gn_1x.py --workdir workdirs/fcos_r101_caffe_fpn_gn_1x
"""

from fcos_jax.config import base as config_base


def get_config():
    c = config_base.get_base_config()
    c.name = "fcos_r101_caffe_fpn_gn_1x"
    c.model.backbone.depth = 101
    return c
