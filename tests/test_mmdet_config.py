"""fcos_jax.convert.mmdet_config: the mmdetection 3 config of every config we have.

What each written config must say comes from mmdetection 3's own FCOS configs for the model-zoo
rows (`configs/fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py` and its R-101, no-GN, X-101 and
center-normbbox-centeronreg-giou variants) and from configs/shapes.py's description for the small
models; it is written here, not taken from the writer. The file must run as Python (as
mmengine's `Config.fromfile` runs it), read back without running it, and give the mmdet
reference (`mmdet_reference.settings_from_config`) the settings our config stands for.
"""

import dataclasses

import numpy as np
import pytest
from subprocess_cli import REPO

from fcos_jax import compare
from fcos_jax.compare import mmdet_reference
from fcos_jax.config import load_config
from fcos_jax.config.classes import coco_classes, shapes_classes
from fcos_jax.convert import ConversionError
from fcos_jax.convert.mmdet_config import mmdet_config, read_mmdet_config, render

CONFIGS = REPO / "configs"
CUSTOM_CLASSES = [(3, "cat"), (7, "dog"), (12, "fox")]

# ImageNet statistics in RGB order on a 0-255 scale (X-101, the shapes models)
IMAGENET_PREPROCESSOR = {
    "model.data_preprocessor.mean": [123.675, 116.28, 103.53],
    "model.data_preprocessor.std": [58.395, 57.12, 57.375],
    "model.data_preprocessor.bgr_to_rgb": True,
}
# mmdetection 3 fcos_r50-caffe_fpn_gn-head_1x_coco.py: the model of the v1 R-50 GN rows.
R50_CAFFE_GN = {
    "model.type": "FCOS",
    "model.data_preprocessor.type": "DetDataPreprocessor",
    "model.data_preprocessor.mean": [102.9801, 115.9465, 122.7717],
    "model.data_preprocessor.std": [1.0, 1.0, 1.0],
    "model.data_preprocessor.bgr_to_rgb": False,
    "model.data_preprocessor.pad_size_divisor": 32,
    "model.backbone.type": "ResNet",
    "model.backbone.depth": 50,
    "model.backbone.base_channels": 64,
    "model.backbone.num_stages": 4,
    "model.backbone.out_indices": (0, 1, 2, 3),
    "model.backbone.frozen_stages": 1,
    "model.backbone.norm_cfg": dict(type="BN", requires_grad=False),
    "model.backbone.norm_eval": True,
    "model.backbone.style": "caffe",
    "model.neck.type": "FPN",
    "model.neck.in_channels": [256, 512, 1024, 2048],
    "model.neck.out_channels": 256,
    "model.neck.start_level": 1,
    "model.neck.add_extra_convs": "on_output",
    "model.neck.num_outs": 5,
    "model.neck.relu_before_extra_convs": True,
    "model.bbox_head.type": "FCOSHead",
    "model.bbox_head.num_classes": 80,
    "model.bbox_head.in_channels": 256,
    "model.bbox_head.stacked_convs": 4,
    "model.bbox_head.feat_channels": 256,
    "model.bbox_head.strides": [8, 16, 32, 64, 128],
    "model.bbox_head.norm_cfg": dict(type="GN", num_groups=32, requires_grad=True),
    "model.bbox_head.conv_bias": False,  # 'auto' with GN
    "model.bbox_head.centerness_on_reg": False,
    "model.bbox_head.norm_on_bbox": False,
    "model.bbox_head.center_sampling": False,
    "model.bbox_head.loss_bbox": dict(type="IoULoss", loss_weight=1.0),
    "model.test_cfg.nms_pre": 1000,
    "model.test_cfg.min_bbox_size": 0,
    "model.test_cfg.score_thr": 0.05,
    "model.test_cfg.nms": dict(type="nms", iou_threshold=0.5),
    "model.test_cfg.max_per_img": 100,
    "resize": dict(type="Resize", scale=(1333, 800), keep_ratio=True),
    "classes": tuple(name for _, name in coco_classes()),
}
R101_CAFFE_GN = {**R50_CAFFE_GN, "model.backbone.depth": 101}
# The no-GN head (fcos_r50_caffe_fpn_1x): norm_cfg=None, conv bias ('auto' without a norm).
R50_CAFFE = {**R50_CAFFE_GN, "model.bbox_head.norm_cfg": None, "model.bbox_head.conv_bias": True}
# fcos_x101-64x4d_fpn_gn-head_ms-640-800-2x_coco.py
X101 = {
    **R50_CAFFE_GN,
    **IMAGENET_PREPROCESSOR,
    "model.backbone.type": "ResNeXt",
    "model.backbone.depth": 101,
    "model.backbone.groups": 64,
    "model.backbone.base_width": 4,
    "model.backbone.norm_cfg": dict(type="BN", requires_grad=True),
    "model.backbone.style": "pytorch",
}
# fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py
IMPROVED = {
    **R50_CAFFE_GN,
    "model.data_preprocessor.mean": [103.53, 116.28, 123.675],  # detectron2's caffe R-50
    "model.bbox_head.norm_on_bbox": True,
    "model.bbox_head.centerness_on_reg": True,
    "model.bbox_head.center_sampling": True,
    "model.bbox_head.conv_bias": True,
    "model.bbox_head.loss_bbox": dict(type="GIoULoss", loss_weight=1.0),
    "model.test_cfg.nms": dict(type="nms", iou_threshold=0.6),
}
# configs/shapes.py: ResNet-18 at quarter width trained from scratch (BN on batch statistics,
# every stage trains), a 32-channel FPN, a 2-conv head with GN(8), the improved recipe, ImageNet
# statistics in RGB, at most 256 px.
SHAPES = {
    **IMPROVED,
    **IMAGENET_PREPROCESSOR,
    "model.backbone.depth": 18,
    "model.backbone.base_channels": 16,
    "model.backbone.style": "pytorch",
    "model.backbone.frozen_stages": -1,
    "model.backbone.norm_cfg": dict(type="BN", requires_grad=True),
    "model.backbone.norm_eval": False,
    "model.neck.in_channels": [16, 32, 64, 128],
    "model.neck.out_channels": 32,
    "model.bbox_head.num_classes": 4,
    "model.bbox_head.in_channels": 32,
    "model.bbox_head.stacked_convs": 2,
    "model.bbox_head.feat_channels": 32,
    "model.bbox_head.norm_cfg": dict(type="GN", num_groups=8, requires_grad=True),
    "resize": dict(type="Resize", scale=(256, 256), keep_ratio=True),
    "classes": ("rectangle", "ellipse", "triangle", "cross"),
}
EXPECTED = {
    "fcos_r50_caffe_fpn_1x": R50_CAFFE,
    "fcos_r50_caffe_fpn_gn_1x": R50_CAFFE_GN,
    "fcos_r50_caffe_fpn_gn_2x": R50_CAFFE_GN,
    "fcos_mstrain_640_800_r50_caffe_fpn_gn_2x": R50_CAFFE_GN,
    "fcos_r101_caffe_fpn_gn_1x": R101_CAFFE_GN,
    "fcos_r101_caffe_fpn_gn_2x": R101_CAFFE_GN,
    "fcos_mstrain_640_800_r101_caffe_fpn_gn_2x": R101_CAFFE_GN,
    "fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x": X101,
    "fcos_center_normbbox_centeronreg_giou_r50_caffe_fpn_gn_1x": IMPROVED,
    "shapes": SHAPES,
    # frozen BN (running statistics never updated), 128 px
    "tiny": {
        **SHAPES,
        "model.backbone.norm_eval": True,
        "resize": dict(type="Resize", scale=(128, 128), keep_ratio=True),
    },
    # the classes of the data; 320 px evaluation
    "custom_coco": {
        **SHAPES,
        "model.bbox_head.num_classes": 3,
        "resize": dict(type="Resize", scale=(320, 320), keep_ratio=True),
        "classes": ("cat", "dog", "fox"),
    },
}


def classes_of(config):
    if config.data.classes == "dataset":
        return CUSTOM_CLASSES
    return coco_classes() if config.data.classes == "coco" else shapes_classes()


def lookup(variables, path):
    if path == "resize":
        return variables["test_dataloader"]["dataset"]["pipeline"][1]
    if path == "classes":
        return variables["test_dataloader"]["dataset"]["metainfo"]["classes"]
    value = variables
    for name in path.split("."):
        value = value[name]
    return value


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def written(request, tmp_path_factory):
    """(config name, our config, the written file) for each config mmdetection can express."""
    config = load_config(CONFIGS / f"{request.param}.py")
    path = tmp_path_factory.mktemp("mmdet_configs") / f"{request.param}.py"
    path.write_text(render(mmdet_config(config, classes_of(config)), "a header\nof two lines"))
    return request.param, config, path


def test_written_config_says_what_mmdetection_says(written):
    name, _, path = written
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # as mmengine runs it
    del namespace["__builtins__"]
    assert namespace == read_mmdet_config(path)  # read back without running it: the same
    assert namespace["default_scope"] == "mmdet"
    assert path.read_text().startswith("# a header\n# of two lines\n")
    for field, value in EXPECTED[name].items():
        assert lookup(namespace, field) == value, field


def fake_tensors(expected) -> dict:
    """Tensors of the widths `expected` states (only their shapes are read)."""
    g = expected.get
    out_channels, feat = g("model.neck.out_channels"), g("model.bbox_head.feat_channels")
    shapes = {
        "backbone.conv1.weight": (g("model.backbone.base_channels"), 3, 7, 7),
        "bbox_head.cls_convs.0.conv.weight": (feat, g("model.bbox_head.in_channels"), 3, 3),
        "bbox_head.conv_cls.weight": (g("model.bbox_head.num_classes"), feat, 3, 3),
    }
    for i, channels in enumerate(g("model.neck.in_channels")[1:]):
        shapes[f"neck.lateral_convs.{i}.conv.weight"] = (out_channels, channels, 1, 1)
    return {k: np.broadcast_to(np.float32(0), shape) for k, shape in shapes.items()}


def test_the_mmdet_reference_runs_what_our_config_says(written):
    """settings_from_config gives the settings compare derives from our config, with
    mmdetection 3's post-processing."""
    name, config, path = written
    settings = mmdet_reference.settings_from_config(
        read_mmdet_config(path), fake_tensors(EXPECTED[name])
    )
    assert settings == dataclasses.replace(compare.mmdet_settings(config), postprocess="v3")


def test_a_width_the_tensors_do_not_have_is_named(tmp_path):
    config = load_config(CONFIGS / "shapes.py")
    path = tmp_path / "shapes.py"
    path.write_text(render(mmdet_config(config, shapes_classes()), "shapes"))
    tensors = fake_tensors({**SHAPES, "model.backbone.base_channels": 32})
    with pytest.raises(mmdet_reference.MmdetReferenceError) as info:
        mmdet_reference.settings_from_config(read_mmdet_config(path), tensors)
    assert str(info.value) == (
        "mmdetection config: base_channels (16,) do not fit backbone.conv1.weight of shape "
        "(32, 3, 7, 7)"
    )


@pytest.mark.parametrize(
    "text,named",
    [
        ("import os\nmodel = dict()\n", ":1: not a plain assignment"),
        ("model = dict(backbone=open('x'))\n", ":1: only dict(key=value) calls are read"),
        ("_base_ = ['fcos.py']\n", ":1: inherits (_base_)"),
        ("scale = 1333 * 2\n", ":1: not a literal value"),
        ("model = dict(\n", ": not Python"),
    ],
)
def test_a_config_is_read_without_running_it(tmp_path, text, named):
    path = tmp_path / "config.py"
    path.write_text(text)
    with pytest.raises(ConversionError) as info:
        read_mmdet_config(path)
    assert str(info.value).startswith(f"{path}{named}"), str(info.value)
