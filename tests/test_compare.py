"""`python -m fcos_jax.compare --format mmdet`: random mmdet checkpoints (tests/mmdet_random.py)
through the mmdet reference (fcos_jax/compare/mmdet_reference.py, pinned in
test_mmdet_reference.py) and our converted model, per level and end to end; a perturbed tensor
fails naming its level; bad input exits 2 with one line. The torchvision mode's CLI is tested in
test_torchvision_parity.py.

Images are 97 x 130 at scale (160, 128) (X-101: (96, 64)), so each model compiles in seconds.
"""

import re

import numpy as np
import pytest
import safetensors.numpy
import torch
from mmdet_random import COMPARE_SCALE, mmdet_checkpoint, mmdet_fcos_shapes
from subprocess_cli import REPO, run_module

from fcos_jax import compare
from fcos_jax.config import load_config

CONFIGS = REPO / "configs"
R50_NO_GN = CONFIGS / "fcos_r50_caffe_fpn_1x.py"
X101 = CONFIGS / "fcos_mstrain_640_800_x101_64x4d_fpn_gn_2x.py"
IMPROVED = CONFIGS / "fcos_center_normbbox_centeronreg_giou_r50_caffe_fpn_gn_1x.py"
TORCHVISION = CONFIGS / "torchvision_fcos_r50_fpn.py"
X101_SCALE = (96, 64)
TABLE_ROW = re.compile(r"^\s+(\d) (cls_logits|bbox_reg|centerness)\s+\S+\s+\S+\s+\S+(.*)$")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One JAX compilation cache for the module's runs (the perturbed run reuses the first)."""
    return tmp_path_factory.mktemp("jax_cache")


def run_compare(cache_dir, config, scale, *args):
    return run_module(
        "fcos_jax.compare", "--format=mmdet", f"--config={config}",
        f"--config.preprocess.scale={scale}", *args,
        env=dict(
            JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
        ),
    )  # fmt: skip


def table(stdout: str) -> dict[tuple[int, str], bool]:
    """(level, output) -> above tolerance, from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        match = TABLE_ROW.match(line)
        if match:
            rows[int(match[1]), match[2]] = "above tolerance" in match[3]
    return rows


def assert_passes(proc):
    print(proc.stdout)  # the per-level table (visible with -s)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table(proc.stdout)
    assert len(rows) == 15 and not any(rows.values()), proc.stdout
    assert "our preprocessing max|diff| 0.00e+00" in proc.stdout
    detections = re.search(r"detections agree: (\d+) ", proc.stdout)
    assert detections and int(detections[1]) > 0, proc.stdout
    assert proc.stdout.rstrip().endswith("PASS")


def settings_for(config_path, scale, **overrides):
    config = load_config(config_path)
    config.preprocess.scale = scale
    for field, value in overrides.items():
        section, name = field.split(".")
        config[section][name] = value
    return compare.mmdet_settings(config)


def test_v1_r50_caffe_gn_converted_checkpoint_passes(mmdet_r50_gn_v1, cache_dir):
    # Our side restored from the convert CLI's output: what is on disk matches the file.
    c = mmdet_r50_gn_v1
    proc = run_compare(
        cache_dir, c["config"], COMPARE_SCALE, f"--input={c['path']}",
        f"--checkpoint={c['output']}", c["image"],
    )  # fmt: skip
    assert_passes(proc)
    assert "input 128x160 (image 119x160)" in proc.stdout


def test_perturbed_tensor_fails_naming_its_level(mmdet_r50_gn_v1, cache_dir, tmp_path):
    c = mmdet_r50_gn_v1
    sd = dict(c["sd"])
    sd["bbox_head.scales.3.scale"] = sd["bbox_head.scales.3.scale"] * 1.01  # P6 regression
    path = tmp_path / "perturbed.pth"
    torch.save({"state_dict": sd}, path)
    proc = run_compare(
        cache_dir, c["config"], COMPARE_SCALE, f"--input={path}", f"--checkpoint={c['output']}",
        c["image"],
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = table(proc.stdout)
    assert len(rows) == 15 and [row for row, above in rows.items() if above] == [(3, "bbox_reg")]
    assert proc.stdout.rstrip().endswith("FAIL")


def test_v1_r50_caffe_no_gn_safetensors_passes(mmdet_r50_gn_v1, cache_dir, tmp_path):
    image = mmdet_r50_gn_v1["image"]
    settings = settings_for(R50_NO_GN, COMPARE_SCALE)
    sd = mmdet_checkpoint(mmdet_fcos_shapes(50, gn=False, names="v1"), settings, image, seed=3)
    path = tmp_path / "fcos_r50_caffe_fpn_1x.safetensors"
    safetensors.numpy.save_file({k: v.numpy() for k, v in sd.items()}, str(path))
    assert_passes(run_compare(cache_dir, R50_NO_GN, COMPARE_SCALE, f"--input={path}", image))


def test_v3_keyed_x101_64x4d_passes(mmdet_r50_gn_v1, cache_dir, tmp_path):
    image = mmdet_r50_gn_v1["image"]
    shapes = mmdet_fcos_shapes(101, groups=64, base_width=4, gn=True, names="v3")
    sd = mmdet_checkpoint(shapes, settings_for(X101, X101_SCALE), image, seed=4)
    path = tmp_path / "fcos_x101_64x4d.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": sd}, path)
    proc = run_compare(cache_dir, X101, X101_SCALE, f"--input={path}", image)
    assert_passes(proc)
    assert "input 64x96 (image 64x86)" in proc.stdout


def test_v3_improved_recipe_passes(mmdet_r50_gn_v1, tmp_path, capsys):
    # centerness on the reg branch, relu(scale * x) * stride, tower conv bias with GN, v3
    # post-processing (per-axis rescale: 119 / 97 and 160 / 130 differ). In process: the
    # command line's own function, without another interpreter start.
    image = mmdet_r50_gn_v1["image"]
    shapes = mmdet_fcos_shapes(50, gn=True, names="v3", conv_bias=True)
    config = load_config(IMPROVED)
    config.preprocess.scale = COMPARE_SCALE
    sd = mmdet_checkpoint(shapes, compare.mmdet_settings(config), image, seed=5, regression="relu")
    path = tmp_path / "fcos_improved.pth"
    torch.save({"state_dict": sd}, path)
    assert compare.compare("mmdet", config, str(path), str(image))
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out)
    rows = table(out)
    assert len(rows) == 15 and not any(rows.values()), out
    assert re.search(r"detections agree: [1-9]", out) and out.rstrip().endswith("PASS")


@pytest.mark.parametrize(
    "case", ["no image", "no checkpoint", "wrong format", "converted for another config"]
)
def test_bad_input_exits_2_with_one_line(mmdet_r50_gn_v1, tmp_path, case):
    c = mmdet_r50_gn_v1
    fmt, config, path, image, extra = "mmdet", c["config"], c["path"], c["image"], []
    if case == "converted for another config":  # same architecture, another config name
        extra = [f"--checkpoint={c['output']}", "--config.name=renamed"]
        expected = (
            f"error: {c['output']}/checkpoints/0: holds a checkpoint of config "
            "'fcos_r50_caffe_fpn_gn_1x', not 'renamed'"
        )
    elif case == "no image":
        image, expected = tmp_path / "missing.png", f"error: image file not found: {tmp_path}"
    elif case == "no checkpoint":
        path, expected = tmp_path / "missing.pth", f"error: checkpoint file not found: {tmp_path}"
    else:  # an mmdet file given as torchvision's
        fmt, config = "torchvision", TORCHVISION
        expected = f"error: {path}: does not fit"
    proc = run_module(
        "fcos_jax.compare", f"--format={fmt}", f"--config={config}", f"--input={path}", *extra,
        image,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    if case == "wrong format":
        assert "(the keys look like --format mmdet)" in lines[0]


@pytest.mark.parametrize(
    "args,named",
    [
        (["--no_such_flag=1", "x.png"], "no_such_flag"),
        ([f"--config={TORCHVISION}", "--input=x.pth", "x.png"], "--format"),
        (["--format=mmdet", f"--config={TORCHVISION}", "--input=x.pth"], "IMAGE"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, named):
    """The same error path as every tool: an unknown flag, a missing required flag, no image."""
    proc = run_module("fcos_jax.compare", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], proc.stderr


def test_configs_without_an_mmdet_counterpart_are_refused():
    with pytest.raises(compare.CompareError) as info:
        compare.mmdet_settings(load_config(TORCHVISION))
    message = str(info.value)
    assert "\n" not in message
    for field in ("preprocess.resize", "model.head.regression", "test.postprocess"):
        assert field in message


def test_match_detections_tolerances_and_min_score_hand_computed():
    """Hand-built sets: a box 1.5 px off and a score 0.01 off match at (2 px, 0.02) but not at
    the float32 defaults; with min_score a weak reference detection without a partner (and a
    count that differs) is no problem, while a strong one still is."""
    from fcos_jax.compare import checks

    ref = {
        "boxes": np.array([[10.0, 10.0, 50.0, 60.0], [0.0, 0.0, 8.0, 8.0]], np.float32),
        "scores": np.array([0.9, 0.1], np.float32),
        "labels": np.array([2, 1]),
    }
    ours = {
        "boxes": np.array([[11.5, 10.0, 50.0, 60.0]], np.float32),
        "scores": np.array([0.91], np.float32),
        "labels": np.array([2]),
    }
    assert checks.match_detections(ours, ref)[0].startswith("count: ours 1 vs reference 2")
    assert len(checks.match_detections(ours, ref, 2.0, 0.02, min_score=0.0)) == 1  # the weak one
    assert checks.match_detections(ours, ref, 2.0, 0.02, min_score=0.5) == []
    assert len(checks.match_detections(ours, ref, 1.0, 0.02, min_score=0.5)) == 1  # 1.5 px > 1
    assert len(checks.match_detections(ours, ref, 2.0, 0.005, min_score=0.5)) == 1  # 0.01 > 0.005
    ours["labels"] = np.array([1])
    assert len(checks.match_detections(ours, ref, 2.0, 0.02, min_score=0.5)) == 1  # other label
