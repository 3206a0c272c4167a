"""The configs and their one check (fcos_jax/config/check.py): every row loads through both
loaders and passes; unknown fields and disagreeing conventions are refused in one line, in a
config file and on the command line (exit 2). Modules are built from their config groups
(fcos_jax/config/groups.py)."""

import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from fcos_jax import inference
from fcos_jax.config import base as config_base
from fcos_jax.config import check as config_check
from fcos_jax.config import load_config, modes
from fcos_jax.config.groups import kwargs_for
from fcos_jax.models import build_model
from fcos_jax.models.resnet import ResNet

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_passes_the_check_through_both_loaders(path):
    config = load_config(path)
    config_check.check(config)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    values(["prog", f"--config={path}"])
    assert values.config.to_dict() == config.to_dict()
    expected = modes.SCALE_FACTOR[config.test.postprocess]
    assert config.preprocess.scale_factor == expected
    assert config.legacy_plus_one == modes.LEGACY_PLUS_ONE[config.test.postprocess]


def _base():
    return config_base.get_base_config()


def test_typos_are_refused_naming_the_field():
    config = _base()
    config.loss.bbox_los = "giou"
    with pytest.raises(ValueError, match=r"^config\.loss\.bbox_los: no such field$"):
        config_check.check(config)


@pytest.mark.parametrize(
    "change,fields",
    [
        (dict(postprocess="mmdet_v3"), ("legacy_plus_one=True", "test.postprocess='mmdet_v3'")),
        (
            dict(legacy_plus_one=False),
            ("legacy_plus_one=False", "test.postprocess='mmdet_v1'"),
        ),
        (
            dict(postprocess="mmdet_v3", legacy_plus_one=False),
            ("preprocess.scale_factor='single'", "test.postprocess='mmdet_v3'"),
        ),
        (
            dict(scale_factor="per_axis"),
            ("preprocess.scale_factor='per_axis'", "test.postprocess='mmdet_v1'"),
        ),
        (
            dict(assigner="torchvision"),
            ("legacy_plus_one=True", "targets.assigner='torchvision'"),
        ),
        (
            dict(resize="torchvision"),
            ("preprocess.scale_factor='single'", "preprocess.resize='torchvision'"),
        ),
        (dict(scale_factor="both"), ("preprocess.scale_factor: expected one of",)),
        (dict(postprocess="v1"), ("test.postprocess: expected one of",)),
    ],
)
def test_disagreeing_conventions_are_refused_naming_both_fields(change, fields):
    config = _base()
    config.test.postprocess = change.get("postprocess", config.test.postprocess)
    config.legacy_plus_one = change.get("legacy_plus_one", config.legacy_plus_one)
    config.preprocess.scale_factor = change.get("scale_factor", config.preprocess.scale_factor)
    config.preprocess.resize = change.get("resize", config.preprocess.resize)
    config.targets.assigner = change.get("assigner", config.targets.assigner)
    with pytest.raises(ValueError) as error:
        config_check.check(config)
    message = str(error.value)
    assert "\n" not in message
    for field in fields:
        assert f"config.{field}" in message, message


def test_the_detector_refuses_a_disagreeing_config():
    config = _base()
    config.test.postprocess = "torchvision"
    with pytest.raises(ValueError, match="config.legacy_plus_one=True disagrees"):
        inference.Detector(config, {})


def test_a_config_file_setting_an_unknown_field_is_refused_with_its_path(tmp_path):
    path = tmp_path / "old.py"
    path.write_text(
        "from fcos_jax.config import base\n\n\ndef get_config():\n"
        "    c = base.get_base_config()\n    c.train.flip_ratio = 0.0\n    return c\n"
    )
    with pytest.raises(ValueError, match=f"^{path}: config.train.flip_ratio: no such field$"):
        load_config(path)


def _run(*args):
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_a_config_file_with_an_unknown_field_fails_in_one_line_with_exit_2(tmp_path):
    path = tmp_path / "old.py"
    path.write_text(
        "from fcos_jax.config import base\n\n\ndef get_config():\n"
        "    c = base.get_base_config()\n"
        "    c.train.assigner = 'torchvision'\n    return c\n"
    )
    run = _run("eval.py", f"--config={path}", "--checkpoint=/nonexistent")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {path}: config.train.assigner: no such field"
    ]


def test_a_missing_field_and_a_mismatch_on_the_command_line_fail_in_one_line():
    typo = _run(
        "eval.py", "--config=configs/shapes.py", "--checkpoint=x", "--config.optim.base_rl=1"
    )
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines() == [
        "error: config.optim.base_rl: no such field (--config.optim.base_rl); did you mean base_lr?"
    ]
    mismatch = _run(
        "eval.py", "--config=configs/shapes.py", "--checkpoint=x", "--config.legacy_plus_one=True"
    )
    assert mismatch.returncode == 2
    (line,) = mismatch.stderr.strip().splitlines()
    assert "config.legacy_plus_one=True" in line and "config.test.postprocess='mmdet_v3'" in line


def test_each_model_part_takes_every_field_its_config_group_names():
    config = _base()
    config.model.backbone.depth, config.model.fpn.out_channels = 101, 128
    config.model.head.strides = [8, 16, 32, 64, 128]  # as a config read back from JSON
    model = build_model(config.model)
    parts = (("backbone", model.backbone), ("fpn", model.neck), ("head", model.bbox_head))
    for group, module in parts:
        for name, value in config.model[group].items():
            if name != "norm_trainable":  # the optimizer's field, not the backbone's
                expected = tuple(value) if isinstance(value, list | tuple) else value
                assert getattr(module, name) == expected, f"model.{group}.{name}"
    assert model.bbox_head.strides == (8, 16, 32, 64, 128)


def test_a_field_two_config_groups_set_must_be_given():
    config = _base()
    with pytest.raises(ValueError, match="ResNet.norm: set by two config groups"):
        kwargs_for(ResNet, config.model.backbone, config.model.head)
