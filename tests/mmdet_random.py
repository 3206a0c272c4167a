"""Random mmdetection FCOS checkpoints in the exact v1 / v3 key layout (test helper).

Keys and shapes are written here from the lists in docs/modes.md §2.2 and §2.11, not taken from
the converter's tables. Values have natural magnitudes and nothing is an identity; BN running
statistics are then measured on an image (`calibrate`), as trained statistics would be, so that
activations stay in a sane range through 100 layers and the checkpoint carries its own
statistics. The classifier bias makes a handful of classes fire, so detections are few and clear.
"""

import cv2
import numpy as np
import torch

from fcos_jax.compare import mmdet_reference
from fcos_jax.testing.images import natural_image

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BN_LEAVES = ("weight", "bias", "running_mean", "running_var")
ACTIVE_CLASSES = (0, 2, 17, 39, 56)  # person, car, dog, bottle, chair
COMPARE_SCALE = (160, 128)  # config.preprocess.scale of the comparisons: small and fast


def resnet_shapes(prefix: str, depth: int, groups: int = 1, base_width: int = 64, counter=True):
    """ResNet/ResNeXt state-dict keys and shapes in mmdet/torchvision naming."""
    shapes = {}

    def bn(name, channels):
        shapes.update({f"{name}.{leaf}": (channels,) for leaf in BN_LEAVES})
        if counter:
            shapes[f"{name}.num_batches_tracked"] = ()

    shapes[f"{prefix}conv1.weight"] = (64, 3, 7, 7)
    bn(f"{prefix}bn1", 64)
    inplanes = 64
    for i, blocks in enumerate(STAGE_BLOCKS[depth]):
        planes = 64 * 2**i
        width = planes * base_width // 64 * groups
        for j in range(blocks):
            p = f"{prefix}layer{i + 1}.{j}."
            shapes[p + "conv1.weight"] = (width, inplanes, 1, 1)
            bn(p + "bn1", width)
            shapes[p + "conv2.weight"] = (width, width // groups, 3, 3)
            bn(p + "bn2", width)
            shapes[p + "conv3.weight"] = (planes * 4, width, 1, 1)
            bn(p + "bn3", planes * 4)
            if j == 0:
                shapes[p + "downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(p + "downsample.1", planes * 4)
            inplanes = planes * 4
    return shapes


def mmdet_fcos_shapes(
    depth, groups=1, base_width=64, gn=True, names="v1", num_classes=80, conv_bias=None
):
    """mmdet FCOS keys: v1 predictors `fcos_*`, v2/v3 `conv_*` (docs/modes.md §2.11). Tower convs
    carry a bias without GN, or with GN when `conv_bias` (v2+ option)."""
    conv_bias = not gn if conv_bias is None else conv_bias
    shapes = resnet_shapes("backbone.", depth, groups, base_width)
    for i, channels in enumerate((512, 1024, 2048)):
        shapes[f"neck.lateral_convs.{i}.conv.weight"] = (256, channels, 1, 1)
        shapes[f"neck.lateral_convs.{i}.conv.bias"] = (256,)
    for i in range(5):
        shapes[f"neck.fpn_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        shapes[f"neck.fpn_convs.{i}.conv.bias"] = (256,)
    for branch in ("cls_convs", "reg_convs"):
        for i in range(4):
            shapes[f"bbox_head.{branch}.{i}.conv.weight"] = (256, 256, 3, 3)
            if conv_bias:
                shapes[f"bbox_head.{branch}.{i}.conv.bias"] = (256,)
            if gn:
                shapes[f"bbox_head.{branch}.{i}.gn.weight"] = (256,)
                shapes[f"bbox_head.{branch}.{i}.gn.bias"] = (256,)
    prefix = "bbox_head.fcos_" if names == "v1" else "bbox_head.conv_"
    for name, out in (("cls", num_classes), ("reg", 4), ("centerness", 1)):
        shapes[f"{prefix}{name}.weight"] = (out, 256, 3, 3)
        shapes[f"{prefix}{name}.bias"] = (out,)
    for level in range(5):
        shapes[f"bbox_head.scales.{level}.scale"] = ()
    return shapes


def random_state_dict(shapes: dict, seed: int, regression: str = "exp") -> dict[str, torch.Tensor]:
    """Random values with natural magnitudes; nothing is an identity (BN stats: `calibrate`).

    regression: 'exp' (exp(scale * x), v1) or 'relu' (relu(scale * x) * stride): sets the
    regression bias so that boxes are tens of pixels (a few strides)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            value = np.array(rng.integers(1, 100000), np.int64)
        elif key.endswith(".scale"):
            value = np.array(rng.uniform(0.8, 1.2), np.float32)
        elif len(shape) == 4:
            fan_in = np.prod(shape[1:])
            predictor = "_cls." in key or "_reg." in key or "_centerness." in key
            std = 0.01 if predictor else np.sqrt(2.0 / fan_in)
            value = rng.standard_normal(shape, np.float32) * np.float32(std)
        elif key.endswith("_cls.bias"):
            value = rng.normal(-4.0, 0.3, shape)
            value[list(ACTIVE_CLASSES)] = rng.uniform(-1.0, 0.3, len(ACTIVE_CLASSES))
        elif key.endswith("_reg.bias"):
            value = (
                rng.uniform(2.5, 3.5, shape) if regression == "exp" else rng.uniform(1, 3, shape)
            )
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, shape)
        elif key.endswith("bn3.weight"):  # small residual branches, as in trained ResNets
            value = rng.uniform(0.1, 0.3, shape)
        elif key.endswith("weight"):  # BN / GN affine
            value = rng.uniform(0.5, 1.5, shape)
        else:  # conv, BN, GN biases and running means
            value = rng.normal(0.0, 0.2, shape)
        sd[key] = torch.from_numpy(
            np.asarray(value, np.int64 if value.dtype == np.int64 else np.float32)
        )
    return sd


class _Calibrating(mmdet_reference.MmdetFcosNet):
    """Each BN first sets its running stats from this input's batch statistics, perturbed."""

    def __init__(self, state_dict, settings, seed):
        super().__init__(state_dict, settings)
        self.generator = torch.Generator().manual_seed(seed)

    def batch_norm(self, x, name):
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False).clamp(min=1e-2)
        noise = torch.randn(mean.shape, generator=self.generator)
        factor = torch.empty(var.shape).uniform_(0.7, 1.4, generator=self.generator)
        self.sd[f"{name}.running_mean"] = mean + 0.1 * var.sqrt() * noise
        self.sd[f"{name}.running_var"] = var * factor
        return super().batch_norm(x, name)


def calibrate(sd: dict, settings, image_nchw: torch.Tensor, seed: int = 0) -> dict:
    """`sd` with every BN's running statistics measured on `image_nchw` (then perturbed)."""
    net = _Calibrating(sd, settings, seed)
    with torch.inference_mode():
        net.backbone(image_nchw.float())
    return {
        k: net.sd[k].clone() if k.endswith("running_mean") or k.endswith("running_var") else v
        for k, v in sd.items()
    }


def write_test_image(path, h: int = 97, w: int = 130, seed: int = 2):
    """A natural-looking [h, w] PNG (the default resizes to 119 x 160 at scale (160, 128), with
    different y and x factors)."""
    cv2.imwrite(str(path), natural_image(h, w, seed)[:, :, ::-1])
    return path


def mmdet_checkpoint(shapes: dict, settings, image_path, seed: int, regression: str = "exp"):
    """A random state dict of `shapes` whose BN statistics are measured on `image_path` as the
    reference preprocesses it for `settings` (`mmdet_reference.MmdetFcos`)."""
    image = mmdet_reference.prepare(mmdet_reference.read_bgr(image_path), settings).image
    return calibrate(random_state_dict(shapes, seed, regression), settings, image, seed)
