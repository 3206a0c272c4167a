"""mmdet v1 FCOS R-50 caffe FPN, no GN, 1x: 35.7 box AP (mmdetection v1 model zoo).

python -m fcos_jax.convert --format mmdet --config configs/fcos_r50_caffe_fpn_1x.py --input fcos_r50_caffe_fpn_1x_4gpu_20190516-a7cac5ff.pth --output ckpt/fcos_r50_caffe_fpn_1x
python -m fcos_jax.predict --config configs/fcos_r50_caffe_fpn_1x.py --checkpoint ckpt/fcos_r50_caffe_fpn_1x image.jpg
python eval.py --config configs/fcos_r50_caffe_fpn_1x.py --checkpoint ckpt/fcos_r50_caffe_fpn_1x
python train.py --config configs/fcos_r50_caffe_fpn_1x.py --workdir workdirs/fcos_r50_caffe_fpn_1x
"""

from fcos_jax.config import base as config_base


def get_config():
    c = config_base.get_base_config()
    c.name = "fcos_r50_caffe_fpn_1x"
    c.model.head.norm = "none"  # tower convs then carry a bias
    return c
