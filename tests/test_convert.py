"""fcos_jax.convert: mmdet / torchvision / backbone state dicts -> our variables, and its errors.

Random state dicts come from the key/shape lists of docs/modes.md §2.2 and §2.11
(tests/mmdet_random.py; written there, not taken from the converter's tables).
"""

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from mmdet_random import mmdet_fcos_shapes, random_state_dict, resnet_shapes
from subprocess_cli import REPO, run_module

from fcos_jax.checkpoint import store
from fcos_jax.config import load_config
from fcos_jax.convert import (
    ConversionError,
    Converted,
    convert_state_dict,
    describe,
    read_state_dict,
    write_converted,
)

CONFIGS = REPO / "configs"
R50_GN = CONFIGS / "fcos_r50_caffe_fpn_gn_1x.py"
R50_NO_GN = CONFIGS / "fcos_r50_caffe_fpn_1x.py"
X101 = CONFIGS / "fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x.py"
TORCHVISION = CONFIGS / "torchvision_fcos_r50_fpn.py"

# --- mmdet --------------------------------------------------------------------------------------
# The numerical parity of converted mmdet checkpoints (v1 R-50 GN, no-GN, v3-keyed X-101) with
# the mmdet reference is tested through the compare CLI in test_compare.py.


def numpy_dict(sd):
    return {k: v.numpy() for k, v in sd.items()}


def run_cli(*args):
    return run_module("fcos_jax.convert", *args)


def test_cli_converts_mmdet_v1_file_keeping_its_bn_counters(mmdet_r50_gn_v1):
    proc = mmdet_r50_gn_v1["proc"]
    assert proc.returncode == 0, proc.stderr
    assert "backbone, bbox_head, neck" in proc.stdout
    assert "53 BatchNorm num_batches_tracked counters kept in the meta" in proc.stdout
    assert "ignored on purpose" not in proc.stdout
    assert "left at their initialisation" not in proc.stdout
    assert (mmdet_r50_gn_v1["output"] / "checkpoints" / "0" / "params").is_dir()


def test_converted_meta_holds_coco_class_list_in_channel_order(mmdet_r50_gn_v1):
    _, meta = store.restore_inference(mmdet_r50_gn_v1["output"], load_config(R50_GN))
    assert meta["config_name"] == "fcos_r50_caffe_fpn_gn_1x"
    assert "fcos_r50_caffe_fpn_gn_1x_4gpu.pth" in meta["source"]
    assert len(meta["classes"]) == 80
    assert meta["classes"][0] == [1, "person"]
    assert meta["classes"][11] == [13, "stop sign"]  # COCO id 12 is unused
    assert meta["classes"][-1] == [90, "toothbrush"]
    sd = mmdet_r50_gn_v1["sd"]
    counters = meta["num_batches_tracked"]
    assert len(counters) == sum(k.endswith("num_batches_tracked") for k in sd) == 53
    assert counters["backbone/layer3_4/bn2"] == int(sd["backbone.layer3.4.bn2.num_batches_tracked"])
    assert counters["backbone/layer4_0/downsample_bn"] == int(
        sd["backbone.layer4.0.downsample.1.num_batches_tracked"]
    )


def test_a_file_without_classes_for_a_data_sized_config_is_refused_before_writing(tmp_path):
    """A file with no class list, converted for a config that takes its class list from the data:
    the checkpoint could not say which channel is which category, so nothing is written."""
    config = load_config(R50_GN)
    config.data.classes = "dataset"
    converted = Converted(
        params={}, batch_stats={}, parts=(), untouched=(), ignored=(), num_tensors=0
    )
    with pytest.raises(ConversionError, match=r"model.pth: carries no class list.*data.classes"):
        write_converted(converted, tmp_path / "out", config, "model.pth")
    assert not (tmp_path / "out").exists()


def test_classifier_bias_is_not_rotated(mmdet_r50_gn_v1):
    # mmdet's upgrade_model_version rotates the cls bias by one; we must not (docs/modes.md §2.11).
    variables, _ = store.restore_inference(mmdet_r50_gn_v1["output"], load_config(R50_GN))
    bias = np.asarray(variables["params"]["bbox_head"]["conv_cls"]["bias"])
    np.testing.assert_array_equal(bias, mmdet_r50_gn_v1["sd"]["bbox_head.fcos_cls.bias"].numpy())


def test_mmdet_v3_names_and_x101_grouped_convs_convert():
    shapes = mmdet_fcos_shapes(101, groups=64, base_width=4, gn=True, names="v3")
    assert shapes["backbone.layer4.0.conv2.weight"] == (2048, 32, 3, 3)  # docs/modes.md §2.2
    sd = numpy_dict(random_state_dict(shapes, seed=5))
    converted = convert_state_dict(sd, "mmdet", load_config(X101))
    assert converted.ignored == ()
    assert len(converted.counters) == sum(k.endswith("num_batches_tracked") for k in sd)
    head = converted.params["bbox_head"]
    np.testing.assert_array_equal(head["conv_reg"]["bias"], sd["bbox_head.conv_reg.bias"])
    kernel = converted.params["backbone"]["layer3_22"]["conv2"]["kernel"]
    np.testing.assert_array_equal(
        kernel, sd["backbone.layer3.22.conv2.weight"].transpose(2, 3, 1, 0)
    )


# --- torchvision -------------------------------------------------------------------------------


def randomized(state_dict):
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
    return randomized(built.state_dict()), randomized(frozen.state_dict())


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
    assert converted.ignored == ()
    assert len(converted.counters) == 53  # BatchNorm2d counters, kept for the way back
    check_torchvision_spots(converted, sd)


def test_torchvision_frozen_batchnorm_state_dict_converts(torchvision_state_dicts):
    built, frozen = torchvision_state_dicts
    assert set(frozen) == {k for k in built if not k.endswith("num_batches_tracked")}
    converted = convert_state_dict(frozen, "torchvision", load_config(TORCHVISION))
    assert converted.ignored == () and converted.counters == {}
    check_torchvision_spots(converted, frozen)


# --- ImageNet backbones ------------------------------------------------------------------------


def test_caffe_resnet50_backbone_converts_and_reports_untouched_parts():
    shapes = resnet_shapes("", 50, counter=False)
    # A possible unused stem bias of caffe conversions (docs/modes.md §2.2).
    shapes["conv1.bias"] = (64,)
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
    sd = randomized(torchvision.models.resnet50().state_dict())
    converted = convert_state_dict(sd, "backbone", load_config(TORCHVISION))
    assert converted.ignored == ("fc.bias", "fc.weight")
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
def r50_gn_arrays(mmdet_r50_gn_v1):
    return numpy_dict(mmdet_r50_gn_v1["sd"])


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


RANDOM_BYTES = np.random.default_rng(0).bytes(4096)  # fixed: parallel workers collect alike


@pytest.mark.parametrize(
    "content", [RANDOM_BYTES, b"just a text file\nnot weights\n"], ids=["random", "text"]
)
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


def test_cli_wrong_format_names_keys_and_suggests_the_right_one(mmdet_r50_gn_v1, tmp_path):
    path = mmdet_r50_gn_v1["path"]
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


@pytest.mark.parametrize(
    "args,named",
    [
        (["--no_such_flag=1"], "no_such_flag"),
        (["--format=mmdet", f"--config={R50_GN}", "--input=x.pth"], "--output"),
        (
            ["--format=mmdet", f"--config={R50_GN}", "--input=x.pth", "--output=o", "extra"],
            "unexpected arguments",
        ),
    ],
)
def test_cli_usage_errors_exit_2_with_one_line(args, named):
    """The same error path as every tool: an unknown flag, a missing required flag, an extra
    argument."""
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], proc.stderr
