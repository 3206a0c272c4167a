"""fcos_jax.compare.mmdet_reference pinned to references no one here wrote.

- torchvision's FCOS, for the subset the two share (pytorch-style R-50, GN head with conv bias,
  P6 from the P5 output, centerness on the regression branch, relu(x) * stride regression): a
  randomised `fcos_resnet50_fpn` with its weights mapped into mmdet's names (Scale 1).
- torchvision's ResNet-50 with the stride moved to conv1 (caffe style) and its ResNeXt-101
  64x4d: the backbone outputs C2..C5.
- the plain-Python references of the v1 and v3 test paths (tests/detect_reference.py).
- hand-computed preprocessing (mmcv sizes, normalisation, padding).
"""

import dataclasses
import re

import numpy as np
import pytest
import torch
import torchvision
from detect_reference import (
    F32,
    MODE_SETTINGS,
    STRIDES,
    greedy_nms_reference,
    random_head,
    reference_detect,
)

from fcos_jax.compare import mmdet_reference as ref
from fcos_jax.compare.torchvision_random import calibrate_batch_norms, random_fcos
from fcos_jax.testing.images import natural_image

IMAGENET_MEAN_01 = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD_01 = torch.tensor([0.229, 0.224, 0.225])


def imagenet_input(h: int, w: int, seed: int) -> torch.Tensor:
    """[1, 3, h, w] float32: a natural image, ImageNet-normalised (h, w multiples of 32)."""
    rgb = torch.from_numpy(natural_image(h, w, seed)).permute(2, 0, 1).float() / 255
    return ((rgb - IMAGENET_MEAN_01[:, None, None]) / IMAGENET_STD_01[:, None, None])[None]


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what):
    assert ours.shape == theirs.shape, what
    scale = theirs.abs().max()
    assert torch.isfinite(theirs).all() and scale > 1e-3, what
    assert (ours - theirs).abs().max() <= 1e-5 * scale, (what, float((ours - theirs).abs().max()))


# --- torchvision FCOS ---------------------------------------------------------------------------


def _tower_name(match: re.Match) -> str:
    branch = "cls_convs" if match[1] == "classification" else "reg_convs"
    index, offset = divmod(int(match[2]), 3)
    return f"bbox_head.{branch}.{index}.{'conv' if offset == 0 else 'gn'}.{match[3]}"


# torchvision FCOS state-dict key -> mmdet key (written from both libraries' module names).
TORCHVISION_TO_MMDET = (
    (r"backbone\.body\.(.*)", r"backbone.\1"),
    (r"backbone\.fpn\.inner_blocks\.(\d)\.0\.(.*)", r"neck.lateral_convs.\1.conv.\2"),
    (r"backbone\.fpn\.layer_blocks\.(\d)\.0\.(.*)", r"neck.fpn_convs.\1.conv.\2"),
    (r"backbone\.fpn\.extra_blocks\.p6\.(.*)", r"neck.fpn_convs.3.conv.\1"),
    (r"backbone\.fpn\.extra_blocks\.p7\.(.*)", r"neck.fpn_convs.4.conv.\1"),
    (r"head\.(classification|regression)_head\.conv\.(\d+)\.(.*)", _tower_name),
    (r"head\.classification_head\.cls_logits\.(.*)", r"bbox_head.conv_cls.\1"),
    (r"head\.regression_head\.bbox_reg\.(.*)", r"bbox_head.conv_reg.\1"),
    (r"head\.regression_head\.bbox_ctrness\.(.*)", r"bbox_head.conv_centerness.\1"),
)


def torchvision_to_mmdet(state_dict: dict) -> dict:
    """torchvision FCOS weights under mmdet v3 names, with Scale 1 on every level."""
    mapped = {}
    for key, value in state_dict.items():
        for pattern, target in TORCHVISION_TO_MMDET:
            if re.fullmatch(pattern, key):
                mapped[re.sub(pattern, target, key)] = value
                break
        else:
            raise AssertionError(f"unmapped torchvision key {key}")
    mapped.update({f"bbox_head.scales.{i}.scale": torch.tensor(1.0) for i in range(5)})
    return mapped


def test_fcos_matches_torchvision_fcos_on_their_shared_subset():
    image = imagenet_input(96, 128, seed=21)
    model = random_fcos(3, natural_image(96, 128, seed=21), min_size=96, max_size=128)
    settings = ref.MmdetFcos(
        style="pytorch", centerness_on_reg=True, norm_on_bbox=True, postprocess="v3"
    )
    net = ref.MmdetFcosNet(torchvision_to_mmdet(model.state_dict()), settings)
    with torch.inference_mode():
        features = list(model.backbone(image).values())
        theirs = model.head(features)
        ours = net.forward(image)  # also checks that every mapped tensor was read
    start = 0
    for level, (outputs, stride) in enumerate(zip(ours, STRIDES, strict=True)):
        cls_score, bbox_pred, centerness = (t[0].permute(1, 2, 0).flatten(0, 1) for t in outputs)
        end = start + len(cls_score)
        assert_close(cls_score, theirs["cls_logits"][0, start:end], (level, "cls"))
        # torchvision: relu(x) in units of the anchor size (= stride).
        assert_close(bbox_pred, theirs["bbox_regression"][0, start:end] * stride, level)
        assert_close(centerness, theirs["bbox_ctrness"][0, start:end], (level, "ctr"))
        start = end
    assert start == theirs["cls_logits"].shape[1]


# --- torchvision ResNet / ResNeXt backbones ------------------------------------------------------


def torchvision_stages(model, image):
    x = model.maxpool(model.relu(model.bn1(model.conv1(image))))
    outs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        outs.append(x)
    return outs


def backbone_case(model, image, settings, seed):
    generator = torch.Generator().manual_seed(seed)
    calibrate_batch_norms(model, lambda: torchvision_stages(model, image), generator)
    sd = {f"backbone.{k}": v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    with torch.inference_mode():
        theirs = torchvision_stages(model, image)
        ours = ref.MmdetFcosNet(sd, settings).backbone(image)
    for stage, (o, t) in enumerate(zip(ours, theirs, strict=True)):
        assert_close(o, t, f"C{stage + 2}")


def test_caffe_style_resnet50_matches_torchvision_with_the_stride_on_conv1():
    torch.manual_seed(4)
    model = torchvision.models.resnet50()
    for layer in (model.layer2, model.layer3, model.layer4):  # caffe: stride on the 1x1 conv1
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    image = imagenet_input(64, 96, seed=22)
    backbone_case(model, image, ref.MmdetFcos(depth=50, style="caffe"), seed=5)


def test_resnext101_64x4d_matches_torchvision():
    torch.manual_seed(6)
    model = torchvision.models.resnext101_64x4d()
    image = imagenet_input(64, 64, seed=23)
    backbone_case(model, image, ref.MmdetFcos(depth=101, style="pytorch", groups=64), seed=7)


# --- post-processing ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_postprocess_matches_the_plain_python_reference(version):
    mode = f"mmdet_{version}"
    max_det, nms_pre = 10, 20
    head = random_head(seed={"v1": 31, "v3": 32}[version], batch=3, num_classes=4)
    sparse = np.random.default_rng(0)
    for level in head:  # image 2: few candidates, so it keeps fewer than max_det
        logits = level["cls_logits"][2]
        logits[...] = np.where(sparse.random(logits.shape) < 0.01, F32(2), F32(-10))
    image_hw = [(60, 90), (64, 71), (33, 96)]
    # v1 divides both axes by one float; v3 multiplies each by 1 / its own factor.
    scale_yx = [(1.5, 1.5), (0.75, 0.75 if version == "v1" else 0.5), (1.0, 1.0)]
    settings = ref.MmdetFcos(postprocess=version, nms_pre=nms_pre, max_per_img=max_det)
    settings = dataclasses.replace(settings, **MODE_SETTINGS[mode])
    num_kept = []
    for b in range(3):
        outputs = [
            tuple(
                torch.from_numpy(level[k][b : b + 1]).permute(0, 3, 1, 2)
                for k in ("cls_logits", "bbox_reg", "centerness")
            )
            for level in head
        ]
        (sy, sx), (h, w) = scale_yx[b], image_hw[b]
        prepared = ref.Prepared(torch.zeros(0), (h, w), (0, 0), sy, (sx, sy))
        ours = ref.POSTPROCESS[version](outputs, prepared, settings)
        kept, _ = reference_detect(
            head, b, image_hw[b], scale_yx[b], None, mode, nms_pre,
            settings.score_thr, settings.nms_iou, max_det,
        )  # fmt: skip
        num_kept.append(len(kept))
        np.testing.assert_array_equal(ours["labels"], [k[2] for k in kept])
        np.testing.assert_allclose(ours["scores"], F32([k[0] for k in kept]), rtol=1e-6)
        np.testing.assert_array_equal(ours["boxes"], F32([k[3] for k in kept]).reshape(-1, 4))
    assert max(num_kept) == max_det and min(num_kept) < max_det


def test_nms_matches_torchvision_and_counts_plus_one_pixels_when_asked():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 50, (200, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + rng.uniform(0.5, 20, (200, 2))], 1)).float()
    scores = torch.from_numpy(rng.random(200).astype(F32))
    plain = ref.nms(boxes, scores, 0.5, offset=0)
    np.testing.assert_array_equal(plain, torchvision.ops.nms(boxes, scores, 0.5))
    plus_one = ref.nms(boxes, scores, 0.5, offset=1)
    cands = [(scores[i].numpy(), i, 0, boxes[i].numpy()) for i in range(200)]
    np.testing.assert_array_equal(
        plus_one, [c[1] for c in greedy_nms_reference(cands, 0.5, 1, 200)]
    )
    assert len(plus_one) != len(plain)


def test_v1_suppresses_by_the_iou_with_plus_one_pixels():
    # Points (4, 4) and (12, 4) at stride 8, class 0 only. A = [0, 0, 9, 9], B = [0, 0, 9, 4.25]:
    # IoU with +1 widths 10 * 5.25 / 100 = 0.525 > 0.5 (B suppressed); without, 0.47.
    cls_score = torch.tensor([[[[2.0, 1.0]]]])  # [1, 1, 1, 2]
    bbox_pred = torch.tensor([[4.0, 12.0], [4.0, 4.0], [5.0, -3.0], [5.0, 0.25]])[None, :, None]
    centerness = torch.zeros(1, 1, 1, 2)
    settings = ref.MmdetFcos(strides=(8,), postprocess="v1")
    prepared = ref.Prepared(torch.zeros(0), (16, 24), (16, 24), 1.0, (1.0, 1.0))
    dets = ref.postprocess_v1([(cls_score, bbox_pred, centerness)], prepared, settings)
    np.testing.assert_array_equal(dets["boxes"], [[0, 0, 9, 9]])
    settings = dataclasses.replace(settings, postprocess="v3")
    dets = ref.postprocess_v3([(cls_score, bbox_pred, centerness)], prepared, settings)
    assert len(dets["boxes"]) == 2  # v3: no +1


# --- preprocessing ----------------------------------------------------------------------------


def test_prepare_follows_mmcv_sizes_normalizes_then_pads(tmp_path):
    # 333 x 501 at (1333, 800): s = min(1333/501, 800/333) = 2.4024; int(501 s + 0.5) = 1204.
    bgr = np.zeros((333, 501, 3), np.uint8)
    bgr[...] = (10, 20, 30)  # a constant image stays constant under resizing
    settings = ref.MmdetFcos(mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 5.0), to_rgb=True)
    prepared = ref.prepare(bgr, settings)
    assert prepared.img_shape == (800, 1204) and prepared.ori_shape == (333, 501)
    assert prepared.factor == pytest.approx(800 / 333)
    assert prepared.scale_factor_wh == (1204 / 501, 800 / 333)
    assert prepared.image.shape == (1, 3, 800, 1216)  # padded to /32
    image = prepared.image[0]
    expected = [(30 - 1) / 2, (20 - 2) / 4, (10 - 3) / 5]  # RGB order after to_rgb
    for channel, value in enumerate(expected):
        assert torch.all(image[channel, :, :1204] == F32(value))
        assert torch.all(image[channel, :, 1204:] == 0)


def test_missing_and_unused_tensors_are_named():
    settings = ref.MmdetFcos(depth=50, style="caffe")
    sd = {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}
    with pytest.raises(ref.MmdetReferenceError, match="needs tensor backbone.bn1.running_mean"):
        ref.MmdetFcosNet(sd, settings).forward(torch.zeros(1, 3, 64, 64))
    net = ref.MmdetFcosNet({"extra.weight": torch.zeros(1), "bn.num_batches_tracked": 3}, settings)
    with pytest.raises(ref.MmdetReferenceError, match="1 tensors not used .*: extra.weight$"):
        net.check_all_read()
    with pytest.raises(ref.MmdetReferenceError, match="style"):
        ref.MmdetFcos(style="detectron")
