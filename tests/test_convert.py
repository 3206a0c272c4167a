"""fcos_jax.convert: mmdet / torchvision / backbone state dicts -> our variables, and its errors.

The parity tests build random state dicts from the spec's key/shape list (spec 1, 9; written here,
not taken from the converter's tables), run an independent float64 forward written with
torch.nn.functional (spec 1-3) and compare it per level with our converted model.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
import torchvision

from fcos_jax import checkpoint
from fcos_jax.config_io import load_config
from fcos_jax.convert import (
    ConversionError,
    convert_file,
    convert_state_dict,
    describe,
    read_state_dict,
)
from fcos_jax.models import build_model

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
R50_GN = CONFIGS / "fcos_r50_caffe_fpn_gn_1x.py"
R50_NO_GN = CONFIGS / "fcos_r50_caffe_fpn_1x.py"
X101 = CONFIGS / "fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x.py"
TORCHVISION = CONFIGS / "torchvision_fcos_r50_fpn.py"

# Spec 7: caffe BGR mean (std 1); ImageNet RGB mean/std on 0-255 for X-101.
CAFFE_MEAN_BGR = np.array([102.9801, 115.9465, 122.7717])
IMAGENET_MEAN = np.array([123.675, 116.28, 103.53])
IMAGENET_STD = np.array([58.395, 57.12, 57.375])
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BN_LEAVES = ("weight", "bias", "running_mean", "running_var")


# --- spec-driven key/shape generator (spec 1 and 9) --------------------------------------------


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


def mmdet_fcos_shapes(depth, groups=1, base_width=64, gn=True, names="v1", num_classes=80):
    """mmdet FCOS keys: v1 predictors `fcos_*`, v2/v3 `conv_*`; spec 9 list."""
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
            if gn:
                shapes[f"bbox_head.{branch}.{i}.gn.weight"] = (256,)
                shapes[f"bbox_head.{branch}.{i}.gn.bias"] = (256,)
            else:
                shapes[f"bbox_head.{branch}.{i}.conv.bias"] = (256,)
    prefix = "bbox_head.fcos_" if names == "v1" else "bbox_head.conv_"
    for name, out in (("cls", num_classes), ("reg", 4), ("centerness", 1)):
        shapes[f"{prefix}{name}.weight"] = (out, 256, 3, 3)
        shapes[f"{prefix}{name}.bias"] = (out,)
    for level in range(5):
        shapes[f"bbox_head.scales.{level}.scale"] = ()
    return shapes


def random_state_dict(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random values with natural magnitudes; nothing is an identity (BN stats set later)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            value = np.array(rng.integers(1, 100000), np.int64)
        elif key.endswith(".scale"):
            value = np.array(rng.uniform(0.6, 1.4), np.float32)
        elif len(shape) == 4:
            fan_in = np.prod(shape[1:])
            predictor = "_cls." in key or "_reg." in key or "_centerness." in key
            std = 0.01 if predictor else np.sqrt(2.0 / fan_in)
            value = rng.standard_normal(shape, np.float32) * np.float32(std)
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


# --- independent reference forward, NCHW (spec 1-3) ------------------------------------


class Reference:
    """FCOS forward with torch.nn.functional on a state dict, in float32 (float64 is much slower
    on CPU; with these weights a float32 forward stays within ~1e-5 of a float64 one).

    With `calibrate`, each BN first sets its running stats from this input's batch statistics,
    perturbed (like trained stats on natural images), then applies them: activations keep
    natural magnitudes through 100 layers and exp() in the head stays finite.
    """

    def __init__(self, sd, calibrate: bool, seed: int = 0):
        self.sd, self.calibrate = sd, calibrate
        self.rng = torch.Generator().manual_seed(seed)

    def w(self, key):
        return self.sd[key].float()

    def conv(self, x, name, stride=1, padding=0, groups=1):
        bias = self.w(f"{name}.bias") if f"{name}.bias" in self.sd else None
        return F.conv2d(x, self.w(f"{name}.weight"), bias, stride, padding, groups=groups)

    def bn(self, x, name):
        if self.calibrate:
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False).clamp(min=1e-2)
            noise = torch.randn(mean.shape, generator=self.rng, dtype=torch.float64)
            factor = torch.empty(var.shape, dtype=torch.float64).uniform_(
                0.7, 1.4, generator=self.rng
            )
            self.sd[f"{name}.running_mean"] = (mean + 0.1 * var.sqrt() * noise).float()
            self.sd[f"{name}.running_var"] = (var * factor).float()
        return F.batch_norm(
            x,
            self.w(f"{name}.running_mean"),
            self.w(f"{name}.running_var"),
            self.w(f"{name}.weight"),
            self.w(f"{name}.bias"),
            training=False,
            eps=1e-5,
        )

    def resnet(self, x, prefix, depth, style, groups):
        """Spec 1: stem, bottlenecks (caffe: stride on conv1 1x1; pytorch: on conv2 3x3)."""
        x = F.relu(self.bn(self.conv(x, f"{prefix}conv1", 2, 3), f"{prefix}bn1"))
        x = F.max_pool2d(x, 3, 2, 1)
        outs = []
        for i, blocks in enumerate(STAGE_BLOCKS[depth]):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                s1, s2 = (stride, 1) if style == "caffe" else (1, stride)
                p = f"{prefix}layer{i + 1}.{j}."
                out = F.relu(self.bn(self.conv(x, p + "conv1", s1), p + "bn1"))
                out = F.relu(self.bn(self.conv(out, p + "conv2", s2, 1, groups), p + "bn2"))
                out = self.bn(self.conv(out, p + "conv3"), p + "bn3")
                if j == 0:
                    x = self.bn(self.conv(x, p + "downsample.0", stride), p + "downsample.1")
                x = F.relu(out + x)
            outs.append(x)
        return outs

    def fpn(self, c3, c4, c5):
        """Spec 2: laterals, nearest x2 top-down, 3x3 outputs, P6 on P5 out, ReLU before P7."""
        laterals = [
            self.conv(c, f"neck.lateral_convs.{i}.conv") for i, c in enumerate((c3, c4, c5))
        ]
        for i in (2, 1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], scale_factor=2, mode="nearest"
            )
        outs = [self.conv(x, f"neck.fpn_convs.{i}.conv", 1, 1) for i, x in enumerate(laterals)]
        p6 = self.conv(outs[2], "neck.fpn_convs.3.conv", 2, 1)
        p7 = self.conv(F.relu(p6), "neck.fpn_convs.4.conv", 2, 1)
        return [*outs, p6, p7]

    def head(self, features, gn, predictor_prefix):
        """Spec 3: towers (conv [+GN] + ReLU), centerness on the cls tower, exp(scale * reg)."""
        outputs = []
        for level, x in enumerate(features):
            towers = {}
            for branch in ("cls_convs", "reg_convs"):
                y = x
                for i in range(4):
                    y = self.conv(y, f"bbox_head.{branch}.{i}.conv", 1, 1)
                    if gn:
                        name = f"bbox_head.{branch}.{i}.gn"
                        y = F.group_norm(
                            y, 32, self.w(f"{name}.weight"), self.w(f"{name}.bias"), 1e-5
                        )
                    y = F.relu(y)
                towers[branch] = y
            scale = self.w(f"bbox_head.scales.{level}.scale")
            reg = self.conv(towers["reg_convs"], f"{predictor_prefix}reg", 1, 1)
            outputs.append(
                {
                    "cls_logits": self.conv(towers["cls_convs"], f"{predictor_prefix}cls", 1, 1),
                    "bbox_reg": torch.exp(scale * reg),
                    "centerness": self.conv(
                        towers["cls_convs"], f"{predictor_prefix}centerness", 1, 1
                    ),
                }
            )
        return outputs

    def fcos(self, image_nchw, depth, style, groups, gn, predictor_prefix):
        c2, c3, c4, c5 = self.resnet(image_nchw, "backbone.", depth, style, groups)
        return self.head(self.fpn(c3, c4, c5), gn, predictor_prefix)


def natural_image(h: int, w: int, seed: int) -> np.ndarray:
    """[h, w, 3] float64 in 0..255: smooth random colour regions, a gradient and texture."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, h // 16 + 2, w // 16 + 2)))
    image = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    image = image.permute(1, 2, 0).numpy()
    image = image + np.linspace(-30, 30, w)[None, :, None] + rng.normal(0, 8, (h, w, 3))
    return np.clip(image, 0, 255)


def run_case(sd, image_nhwc, depth, style, groups, gn, predictor_prefix):
    """Calibrates BN stats on the image and returns the reference outputs, NHWC float64."""
    ref = Reference(sd, calibrate=True)
    x = torch.from_numpy(image_nhwc).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        outputs = ref.fcos(x, depth, style, groups, gn, predictor_prefix)
    return [
        {k: v.permute(0, 2, 3, 1).double().numpy() for k, v in level.items()} for level in outputs
    ]


def assert_levels_match(config, variables, image_nhwc, reference):
    """Per level and output: max |ours - ref| <= 1e-4 * max |ref|.

    Runs op by op (no jit): the compiled ops are cached by shape, so the R-50 models at the same
    image size and X-101's repeated blocks reuse them; much faster than compiling each program.
    """
    model = build_model(config.model)
    variables = jax.tree.map(np.asarray, variables)  # same placement in every case: shared cache
    outputs = model.apply(variables, jnp.asarray(image_nhwc, jnp.float32))
    assert len(outputs) == len(reference) == 5
    for level, (ours, ref) in enumerate(zip(outputs, reference, strict=True)):
        for name in ("cls_logits", "bbox_reg", "centerness"):
            got = np.asarray(ours[name], np.float64)
            assert got.shape == ref[name].shape, (level, name)
            assert np.all(np.isfinite(ref[name])) and np.abs(ref[name]).max() > 1e-3
            err = np.abs(got - ref[name]).max()
            assert err <= 1e-4 * np.abs(ref[name]).max(), (level, name, err)


def numpy_dict(sd):
    return {k: v.numpy() for k, v in sd.items()}


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "fcos_jax.convert", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# --- mmdet parity ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r50_gn_v1(tmp_path_factory):
    """mmdet v1 R-50 GN file (with num_batches_tracked), converted once with the CLI."""
    tmp = tmp_path_factory.mktemp("r50_gn")
    sd = random_state_dict(mmdet_fcos_shapes(50, gn=True, names="v1"), seed=1)
    bgr = natural_image(128, 160, seed=2)
    image = (bgr - CAFFE_MEAN_BGR)[None]
    reference = run_case(sd, image, 50, "caffe", 1, True, "bbox_head.fcos_")
    path = tmp / "fcos_r50_caffe_fpn_gn_1x_4gpu.pth"
    meta = {"mmcv_version": "0.2.7", "mmdet_version": "0.6.0+4bbb4a2", "epoch": 12, "iter": 1}
    # The 2019 files predate torch's zip format: save in the legacy pickle container (spec 9).
    torch.save({"meta": meta, "state_dict": sd}, path, _use_new_zipfile_serialization=False)
    output = tmp / "converted"
    proc = run_cli("--format", "mmdet", "--config", R50_GN, "--input", path, "--output", output)
    return dict(sd=sd, image=image, reference=reference, path=path, output=output, proc=proc)


def test_cli_converts_mmdet_v1_file_and_ignores_only_num_batches_tracked(r50_gn_v1):
    proc = r50_gn_v1["proc"]
    assert proc.returncode == 0, proc.stderr
    assert "backbone, bbox_head, neck" in proc.stdout
    assert "num_batches_tracked" in proc.stdout
    assert "left at their initialisation" not in proc.stdout
    assert (r50_gn_v1["output"] / "checkpoints" / "0" / "params").is_dir()


def test_mmdet_v1_r50_gn_matches_torch_reference_per_level(r50_gn_v1):
    config = load_config(R50_GN)
    variables, _ = checkpoint.restore_inference(r50_gn_v1["output"], config)
    assert_levels_match(config, variables, r50_gn_v1["image"], r50_gn_v1["reference"])


def test_converted_meta_holds_coco_class_list_in_channel_order(r50_gn_v1):
    _, meta = checkpoint.restore_inference(r50_gn_v1["output"], load_config(R50_GN))
    assert meta["config_name"] == "fcos_r50_caffe_fpn_gn_1x"
    assert "fcos_r50_caffe_fpn_gn_1x_4gpu.pth" in meta["source"]
    assert len(meta["classes"]) == 80
    assert meta["classes"][0] == [1, "person"]
    assert meta["classes"][11] == [13, "stop sign"]  # COCO id 12 is unused
    assert meta["classes"][-1] == [90, "toothbrush"]


def test_classifier_bias_is_not_rotated(r50_gn_v1):
    # spec 9: mmdet's upgrade_model_version rotates the 1-D cls bias by one; we must not.
    variables, _ = checkpoint.restore_inference(r50_gn_v1["output"], load_config(R50_GN))
    bias = np.asarray(variables["params"]["bbox_head"]["conv_cls"]["bias"])
    np.testing.assert_array_equal(bias, r50_gn_v1["sd"]["bbox_head.fcos_cls.bias"].numpy())


def test_mmdet_v1_no_gn_from_safetensors_matches_reference(tmp_path):
    sd = random_state_dict(mmdet_fcos_shapes(50, gn=False, names="v1"), seed=3)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    image = (natural_image(128, 160, seed=4) - CAFFE_MEAN_BGR)[None]
    reference = run_case(sd, image, 50, "caffe", 1, False, "bbox_head.fcos_")
    path = tmp_path / "fcos_r50_caffe_fpn_1x.safetensors"
    safetensors.numpy.save_file(numpy_dict(sd), str(path))
    config = load_config(R50_NO_GN)
    converted = convert_file(path, "mmdet", config)
    assert converted.ignored == ()
    variables = {"params": converted.params, "batch_stats": converted.batch_stats}
    assert_levels_match(config, variables, image, reference)


def test_mmdet_v3_names_x101_64x4d_grouped_conv_matches_reference():
    config = load_config(X101)
    shapes = mmdet_fcos_shapes(101, groups=64, base_width=4, gn=True, names="v3")
    assert shapes["backbone.layer4.0.conv2.weight"] == (2048, 32, 3, 3)  # spec 1
    sd = random_state_dict(shapes, seed=5)
    rgb = natural_image(64, 96, seed=6)
    image = ((rgb - IMAGENET_MEAN) / IMAGENET_STD)[None]
    reference = run_case(sd, image, 101, "pytorch", 64, True, "bbox_head.conv_")
    converted = convert_state_dict(numpy_dict(sd), "mmdet", config)
    variables = {"params": converted.params, "batch_stats": converted.batch_stats}
    assert_levels_match(config, variables, image, reference)


# --- torchvision -------------------------------------------------------------------------------


def randomised(state_dict):
    """Each float tensor replaced by distinct random values (so spot checks can tell them apart)."""
    gen = torch.Generator().manual_seed(0)
    return {
        k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v).numpy()
        for k, v in state_dict.items()
    }


@pytest.fixture(scope="module")
def torchvision_state_dicts():
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    built = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None)
    # As the published-weights builder makes it: FrozenBatchNorm2d (no num_batches_tracked).
    body = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 3, [2, 3, 4], LastLevelP6P7(256, 256))
    frozen = torchvision.models.detection.FCOS(backbone, num_classes=91)
    return randomised(built.state_dict()), randomised(frozen.state_dict())


def check_torchvision_spots(converted, sd):
    p, s = converted.params, converted.batch_stats
    hwio = lambda key: sd[key].transpose(2, 3, 1, 0)  # noqa: E731
    eq = np.testing.assert_array_equal
    eq(p["backbone"]["conv1"]["kernel"], hwio("backbone.body.conv1.weight"))
    eq(p["backbone"]["layer2_0"]["conv2"]["kernel"], hwio("backbone.body.layer2.0.conv2.weight"))
    eq(
        p["backbone"]["layer4_0"]["downsample_bn"]["bias"],
        sd["backbone.body.layer4.0.downsample.1.bias"],
    )
    eq(s["backbone"]["layer3_5"]["bn2"]["var"], sd["backbone.body.layer3.5.bn2.running_var"])
    eq(s["backbone"]["layer1_2"]["bn3"]["mean"], sd["backbone.body.layer1.2.bn3.running_mean"])
    eq(p["neck"]["lateral_convs_1"]["bias"], sd["backbone.fpn.inner_blocks.1.0.bias"])
    eq(p["neck"]["lateral_convs_2"]["kernel"], hwio("backbone.fpn.inner_blocks.2.0.weight"))
    eq(p["neck"]["fpn_convs_2"]["kernel"], hwio("backbone.fpn.layer_blocks.2.0.weight"))
    eq(p["neck"]["fpn_convs_3"]["kernel"], hwio("backbone.fpn.extra_blocks.p6.weight"))
    eq(p["neck"]["fpn_convs_4"]["bias"], sd["backbone.fpn.extra_blocks.p7.bias"])
    head = p["bbox_head"]
    eq(head["cls_convs_2"]["conv"]["kernel"], hwio("head.classification_head.conv.6.weight"))
    eq(head["cls_convs_2"]["conv"]["bias"], sd["head.classification_head.conv.6.bias"])
    eq(head["cls_convs_2"]["gn"]["scale"], sd["head.classification_head.conv.7.weight"])
    eq(head["reg_convs_3"]["gn"]["bias"], sd["head.regression_head.conv.10.bias"])
    eq(head["reg_convs_0"]["conv"]["kernel"], hwio("head.regression_head.conv.0.weight"))
    eq(head["conv_cls"]["bias"], sd["head.classification_head.cls_logits.bias"])
    eq(head["conv_reg"]["kernel"], hwio("head.regression_head.bbox_reg.weight"))
    eq(head["conv_centerness"]["kernel"], hwio("head.regression_head.bbox_ctrness.weight"))


def test_torchvision_built_without_weights_converts(torchvision_state_dicts):
    sd, _ = torchvision_state_dicts
    converted = convert_state_dict(sd, "torchvision", load_config(TORCHVISION))
    assert converted.untouched == ()
    counters = sorted(k for k in sd if k.endswith("num_batches_tracked"))
    assert len(counters) == 53 and list(converted.ignored) == counters
    check_torchvision_spots(converted, sd)


def test_torchvision_frozen_batchnorm_state_dict_converts(torchvision_state_dicts):
    built, frozen = torchvision_state_dicts
    assert set(frozen) == {k for k in built if not k.endswith("num_batches_tracked")}
    converted = convert_state_dict(frozen, "torchvision", load_config(TORCHVISION))
    assert converted.ignored == ()
    check_torchvision_spots(converted, frozen)


# --- ImageNet backbones ------------------------------------------------------------------------


def test_caffe_resnet50_backbone_converts_and_reports_untouched_parts():
    shapes = resnet_shapes("", 50, counter=False)
    shapes["conv1.bias"] = (64,)  # a possible unused stem bias of caffe conversions (spec 1)
    sd = numpy_dict(random_state_dict(shapes, seed=7))
    converted = convert_state_dict(sd, "backbone", load_config(R50_GN))
    assert converted.parts == ("backbone",) and converted.untouched == ("bbox_head", "neck")
    assert converted.ignored == ("conv1.bias",)
    assert set(converted.params) == {"backbone"} and set(converted.batch_stats) == {"backbone"}
    np.testing.assert_array_equal(
        converted.params["backbone"]["layer2_0"]["conv1"]["kernel"],
        sd["layer2.0.conv1.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        converted.batch_stats["backbone"]["bn1"]["var"], sd["bn1.running_var"]
    )
    assert any("bbox_head, neck" in line for line in describe(converted))


def test_torchvision_resnet50_backbone_converts_ignoring_fc():
    sd = randomised(torchvision.models.resnet50().state_dict())
    converted = convert_state_dict(sd, "backbone", load_config(TORCHVISION))
    assert {"fc.weight", "fc.bias"} <= set(converted.ignored)
    assert all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in converted.ignored)
    np.testing.assert_array_equal(
        converted.params["backbone"]["layer3_0"]["downsample_conv"]["kernel"],
        sd["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )


def test_resnext101_64x4d_backbone_converts():
    sd = numpy_dict(random_state_dict(resnet_shapes("", 101, 64, 4), seed=8))
    converted = convert_state_dict(sd, "backbone", load_config(X101))
    kernel = converted.params["backbone"]["layer3_22"]["conv2"]["kernel"]
    assert kernel.shape == (3, 3, 16, 1024)
    np.testing.assert_array_equal(kernel, sd["layer3.22.conv2.weight"].transpose(2, 3, 1, 0))


# --- errors ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r50_gn_arrays(r50_gn_v1):
    return numpy_dict(r50_gn_v1["sd"])


def conversion_error(sd, fmt="mmdet", config_path=R50_GN) -> str:
    with pytest.raises(ConversionError) as info:
        convert_state_dict(sd, fmt, load_config(config_path), source="ckpt.pth")
    message = str(info.value)
    assert "\n" not in message and message.startswith("ckpt.pth: ")
    return message


def test_missing_tensor_is_named(r50_gn_arrays):
    sd = dict(r50_gn_arrays)
    del sd["backbone.layer3.2.bn2.running_var"]
    message = conversion_error(sd)
    assert "1 tensors missing: backbone.layer3.2.bn2.running_var" in message


def test_unexpected_tensor_is_named(r50_gn_arrays):
    sd = dict(r50_gn_arrays, **{"bbox_head.extra_conv.weight": np.zeros((1, 1), np.float32)})
    assert "1 unexpected tensors: bbox_head.extra_conv.weight" in conversion_error(sd)


def test_wrong_shape_names_key_and_both_shapes(r50_gn_arrays):
    sd = dict(r50_gn_arrays, **{"bbox_head.fcos_cls.weight": np.zeros((81, 256, 3, 3), np.float32)})
    message = conversion_error(sd)
    assert "bbox_head.fcos_cls.weight has shape (81, 256, 3, 3)" in message
    assert "needs (80, 256, 3, 3)" in message


def test_file_for_another_model_is_refused(r50_gn_arrays):
    message = conversion_error(r50_gn_arrays, config_path=R50_NO_GN)
    assert "bbox_head.cls_convs.0.conv.bias" in message  # no-GN towers need conv biases
    assert "bbox_head.cls_convs.0.gn" in message


@pytest.mark.parametrize("content", [os.urandom(4096), b"just a text file\nnot weights\n"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_not_a_checkpoint_gives_one_line_naming_the_file(tmp_path, content, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(content)
    with pytest.raises(ConversionError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a") and "\n" not in message


def test_pickle_without_tensors_is_not_a_state_dict(tmp_path):
    path = tmp_path / "run.pth"
    torch.save({"epoch": 3, "lr": 0.01}, path)
    with pytest.raises(ConversionError, match="not a state dict"):
        read_state_dict(path)


def test_wrappers_and_ddp_prefix_are_unwrapped(tmp_path):
    weight = torch.arange(6.0).reshape(2, 3)
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"module.fc.weight": weight}, "epoch": 1}, path)
    np.testing.assert_array_equal(read_state_dict(path)["fc.weight"], weight.numpy())
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": {"a": torch.tensor(2.0)}}, path)
    assert read_state_dict(path)["a"].shape == ()


class RunsCode:
    """Unpickling this calls os.system (touch a marker). weights_only must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_not_run(tmp_path, container):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"conv.weight": RunsCode(marker)}}
    if container == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ConversionError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused") and "system" in message and "\n" not in message
    assert not marker.exists()


def test_cli_refuses_code_running_pickle_with_exit_2(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv.weight": RunsCode(marker)}}, path)
    proc = run_cli(
        "--format", "mmdet", "--config", R50_GN, "--input", path, "--output", tmp_path / "o"
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: refused"), proc.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_cli_wrong_format_names_keys_and_suggests_the_right_one(r50_gn_v1, tmp_path):
    path = r50_gn_v1["path"]
    proc = run_cli(
        "--format",
        "torchvision",
        "--config",
        TORCHVISION,
        "--input",
        path,
        "--output",
        tmp_path / "o",
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: does not fit"), proc.stderr
    assert "tensors missing: backbone.body.bn1.bias" in lines[0]
    assert "unexpected tensors: backbone.conv1.weight" in lines[0]
    assert "(the keys look like --format mmdet)" in lines[0]
