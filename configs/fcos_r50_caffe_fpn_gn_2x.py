"""mmdet v1 FCOS R-50 caffe FPN GN, 2x: 36.9 box AP (mmdetection v1 model zoo).

python -m fcos_jax.convert --format mmdet --config configs/fcos_r50_caffe_fpn_gn_2x.py --input fcos_r50_caffe_fpn_gn_2x_4gpu_20190516_-93484354.pth --output ckpt/fcos_r50_caffe_fpn_gn_2x
python -m fcos_jax.predict --config configs/fcos_r50_caffe_fpn_gn_2x.py --checkpoint ckpt/fcos_r50_caffe_fpn_gn_2x image.jpg
python eval.py --config configs/fcos_r50_caffe_fpn_gn_2x.py --checkpoint ckpt/fcos_r50_caffe_fpn_gn_2x
python train.py --config configs/fcos_r50_caffe_fpn_gn_2x.py --workdir workdirs/fcos_r50_caffe_fpn_gn_2x
"""

from fcos_jax.config import base as config_base


def get_config():
    c = config_base.get_base_config()
    c.name = "fcos_r50_caffe_fpn_gn_2x"
    c.train.epochs, c.optim.lr_steps = 24, (16, 22)
    return c
