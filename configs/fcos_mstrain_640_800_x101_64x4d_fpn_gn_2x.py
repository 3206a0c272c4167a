"""mmdet v1 FCOS X-101-64x4d (pytorch style) FPN GN, multi-scale 640/800, 2x: 42.8 box AP (mmdetection v1 model zoo).

python -m fcos_jax.convert --format mmdet --config configs/fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x.py --input fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x_20190516-a36c0872.pth --output ckpt/fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x
python -m fcos_jax.predict --config configs/fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x.py --checkpoint ckpt/fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x image.jpg
python eval.py --config configs/fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x.py --checkpoint ckpt/fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x
python train.py --config configs/fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x.py --workdir workdirs/fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x
"""

from fcos_jax.config import base as config_base


def get_config():
    c = config_base.get_base_config()
    c.name = "fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x"
    b = c.model.backbone
    b.depth, b.style, b.groups, b.base_width = 101, "pytorch", 64, 4
    b.norm_trainable = True  # ResNeXt BN affine trains (stats stay frozen), docs/modes.md §2.2
    c.preprocess.mean = config_base.IMAGENET_MEAN_RGB
    c.preprocess.std = config_base.IMAGENET_STD_RGB
    c.preprocess.to_rgb = True
    c.train.epochs, c.optim.lr_steps = 24, (16, 22)
    c.augment.multiscale, c.augment.multiscale_mode = ((1333, 640), (1333, 800)), "value"
    c.optim.downsample_bn_bias_as_bias = True  # mmdet v1 param-group quirk, docs/modes.md §2.10
    return c
