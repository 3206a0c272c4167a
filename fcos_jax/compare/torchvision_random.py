"""torchvision FCOS with seeded random weights in which nothing is an identity, for parity
tests and benchmarks.

Every BatchNorm gets running statistics measured on a natural-looking image (so activations stay
in a sane range) and then perturbed, plus random affine parameters; every GroupNorm a random
affine; every conv bias a random value. The classification bias makes a handful of classes
fire with sigmoid around 0.3-0.6 so that detections pass torchvision's 0.2 threshold, and
thousands of candidates reach NMS. Changing it changes the benchmarks' inputs, and so their
numbers (docs/benchmarks.md).
"""

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import fcos_resnet50_fpn

ACTIVE_CLASSES = (1, 3, 18, 44, 62)  # person, car, dog, bottle, chair: the channels that fire


def _samplers(generator: torch.Generator):
    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    def normal(shape, std):
        return std * torch.randn(shape, generator=generator)

    return uniform, normal


def calibrate_batch_norms(model: nn.Module, forward, generator: torch.Generator) -> None:
    """Every BatchNorm2d of `model` gets the running statistics of one `forward()` call in
    training mode (cumulative average), perturbed, and a random affine; `model` ends in eval
    mode."""
    uniform, normal = _samplers(generator)
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in batch_norms:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        forward()
        model.eval()
        for bn in batch_norms:
            bn.momentum = 0.1
            bn.weight.copy_(uniform(bn.weight.shape, 0.7, 1.3))
            bn.bias.copy_(normal(bn.bias.shape, 0.1))
            bn.running_mean.add_(normal(bn.running_mean.shape, 0.1) * bn.running_var.sqrt())
            bn.running_var.mul_(uniform(bn.running_var.shape, 0.8, 1.25))


def random_fcos(seed: int, calibration_rgb: np.ndarray, **kwargs) -> nn.Module:
    """`fcos_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)` randomised, in eval
    mode. calibration_rgb: [H, W, 3] uint8 RGB image for the BN statistics."""
    torch.manual_seed(seed)
    model = fcos_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    generator = torch.Generator().manual_seed(seed + 1)
    uniform, normal = _samplers(generator)
    image = torch.from_numpy(calibration_rgb).permute(2, 0, 1).float() / 255
    batch, _ = model.transform([image])
    calibrate_batch_norms(model, lambda: model.backbone(batch.tensors), generator)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.copy_(uniform(module.weight.shape, 0.7, 1.3))
                module.bias.copy_(normal(module.bias.shape, 0.1))
            elif isinstance(module, nn.Conv2d) and module.bias is not None:
                module.bias.copy_(normal(module.bias.shape, 0.1))
        cls_head = model.head.classification_head
        cls_head.cls_logits.weight.copy_(normal(cls_head.cls_logits.weight.shape, 0.01))
        cls_bias = -4.0 + normal(cls_head.cls_logits.bias.shape, 0.3)
        cls_bias[list(ACTIVE_CLASSES)] = uniform((len(ACTIVE_CLASSES),), -1.0, 0.3)
        cls_head.cls_logits.bias.copy_(cls_bias)
        reg_head = model.head.regression_head
        reg_head.bbox_reg.weight.copy_(normal(reg_head.bbox_reg.weight.shape, 0.02))
        reg_head.bbox_reg.bias.copy_(uniform((4,), 1.0, 3.0))
        reg_head.bbox_ctrness.weight.copy_(normal(reg_head.bbox_ctrness.weight.shape, 0.01))
        reg_head.bbox_ctrness.bias.copy_(uniform((1,), -0.5, 0.5))
    return model


def pretrained_layout_fcos(seed: int) -> nn.Module:
    """torchvision's FCOS as `fcos_resnet50_fpn` builds it with ImageNet or COCO weights (its
    training setting): FrozenBatchNorm2d, `trainable_backbone_layers=3`; random weights."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.fcos import FCOS
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(seed)
    backbone = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    extra = LastLevelP6P7(256, 256)
    backbone = _resnet_fpn_extractor(backbone, 3, returned_layers=[2, 3, 4], extra_blocks=extra)
    return FCOS(backbone, num_classes=91)
