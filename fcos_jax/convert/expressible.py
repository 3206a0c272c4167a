"""Which of our configs each PyTorch builder can express, and in words what it cannot.

  torchvision  `fcos_resnet50_fpn`: one architecture (pytorch-style ResNet-50, 256-wide FPN,
               towers of four conv + bias + GroupNorm(32), centerness on the regression tower,
               relu(x) * stride) with torchvision's own transform and post-processing.
  mmdet        mmdetection 3's `FCOS` (`ResNet`/`ResNeXt` + `FPN` + `FCOSHead`): every backbone
               depth, style and width we build, any FPN and head width, GN or no norm, either
               centerness branch, exp or norm_on_bbox regression; mmdetection's resize and
               post-processing (`mmdet_v1` configs run mmdetection 3's test path there).

Each function returns one short phrase per problem (empty when the config fits), naming our
config field and what the builder has instead.
"""

import math

import ml_collections

from fcos_jax.models.resnet import ARCHS

# (config field, the value torchvision's fcos_resnet50_fpn has, what that value means there)
_TORCHVISION_FCOS = (
    ("model.backbone.depth", 50, "a ResNet-50"),
    ("model.backbone.style", "pytorch", "its bottlenecks stride the 3x3 conv2"),
    ("model.backbone.groups", 1, "a ResNet, not a ResNeXt"),
    ("model.backbone.base_width", 64, "a ResNet, not a ResNeXt"),
    ("model.backbone.stem_width", 64, "a 64-wide stem"),
    ("model.fpn.out_channels", 256, "a 256-wide FPN"),
    ("model.head.feat_channels", 256, "256-wide towers"),
    ("model.head.stacked_convs", 4, "four convs per tower"),
    ("model.head.norm", "gn", "GroupNorm in the towers"),
    ("model.head.gn_groups", 32, "GroupNorm(32)"),
    ("model.head.conv_bias", True, "tower convs with a bias"),
    ("model.head.centerness_on_reg", True, "centerness from the regression tower"),
    ("model.head.regression", "relu_stride", "relu(x) * stride, no Scale"),
    ("model.head.strides", (8, 16, 32, 64, 128), "P3-P7"),
    ("preprocess.resize", "torchvision", "its transform"),
    ("preprocess.unit_range", True, "pixels / 255 before normalising"),
    ("preprocess.to_rgb", True, "RGB input"),
    ("test.postprocess", "torchvision", "its post-processing"),
)


def _field(config: ml_collections.ConfigDict, path: str):
    value = config
    for name in path.split("."):
        value = value[name]
    return tuple(value) if isinstance(value, list | tuple) else value


def torchvision_problems(config: ml_collections.ConfigDict) -> list[str]:
    """What `fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K)` cannot express
    of `config` (its image size, normalisation and thresholds are builder arguments)."""
    problems = []
    for path, wanted, meaning in _TORCHVISION_FCOS:
        ours = _field(config, path)
        if ours != wanted:
            problems.append(f"{path} {ours!r} (torchvision: {wanted!r}, {meaning})")
    return problems


def mmdet_problems(config: ml_collections.ConfigDict) -> list[str]:
    """What mmdetection's FCOS (and the mmdet reference, `fcos_jax/compare/mmdet_reference.py`)
    cannot express of `config`."""
    b, h, p, t = config.model.backbone, config.model.head, config.preprocess, config.test
    unsupported = [
        (p.resize != "mmdet", f"preprocess.resize {p.resize!r} (mmdetection resizes as 'mmdet')"),
        (p.unit_range, "preprocess.unit_range (mmdetection never divides pixels by 255)"),
        (
            h.regression == "relu_stride",
            "model.head.regression 'relu_stride' (torchvision's; mmdetection's head has Scale)",
        ),
        (
            t.postprocess not in ("mmdet_v1", "mmdet_v3"),
            f"test.postprocess {t.postprocess!r} (mmdetection's are mmdet_v1 and mmdet_v3)",
        ),
        (
            (h.regression == "scale_relu_stride") != bool(config.targets.norm_on_bbox),
            f"model.head.regression {h.regression!r} with targets.norm_on_bbox "
            f"{bool(config.targets.norm_on_bbox)} (mmdetection's norm_on_bbox sets both)",
        ),
        (
            not _same_bottleneck_widths(b),
            f"model.backbone.base_width {b.base_width} with groups {b.groups} and stem_width "
            f"{b.stem_width} (mmdetection's widths: planes for ResNet, floor(planes * base_width "
            "/ base_channels) * groups for ResNeXt)",
        ),
    ]
    return [message for bad, message in unsupported if bad]


def _same_bottleneck_widths(backbone: ml_collections.ConfigDict) -> bool:
    """Our bottleneck width floor(planes * base_width / 64) * groups equals mmdetection's in every
    stage (planes = stem_width * 2^i; basic blocks have no such width)."""
    block, _ = ARCHS.get(backbone.depth, ("basic", ()))
    if block != "bottleneck":
        return True
    groups, base_width, stem = backbone.groups, backbone.base_width, backbone.stem_width
    for stage in range(4):
        planes = stem * 2**stage
        ours = math.floor(planes * base_width / 64) * groups
        theirs = planes if groups == 1 else math.floor(planes * base_width / stem) * groups
        if ours != theirs:
            return False
    return True
