"""Shared fixtures. torch and torchvision are imported before anything can import
TensorFlow (docs/architecture.md#imports)."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch  # noqa: F401  (must precede tensorflow: docs/architecture.md#imports)
import torchvision  # noqa: F401  (its ops import triton, which crashes after tensorflow)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_configure(config):
    """One JAX persistent compilation cache for the whole run, inherited by every subprocess
    (train.py, eval.py, predict, export...): the CLI tests start the same tiny model in a few
    dozen processes, and each would otherwise compile the same programs again. Set before JAX
    is imported; removed at the end. A `test.compilation_cache_dir` a test sets still wins."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        directory = tempfile.mkdtemp(prefix="fcos_jax_tests_xla_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
        config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))


@pytest.fixture(scope="session")
def mmdet_r50_gn_v1(tmp_path_factory):
    """A random mmdet v1 R-50 caffe GN checkpoint as the 2019 files are (legacy pickle
    container, meta, num_batches_tracked), the image its BN statistics were measured on, and
    the convert CLI's run on it (shared by the convert and compare tests)."""
    from mmdet_random import COMPARE_SCALE, mmdet_checkpoint, mmdet_fcos_shapes, write_test_image
    from subprocess_cli import run_module

    from fcos_jax.compare import mmdet_settings
    from fcos_jax.config import load_config

    tmp = tmp_path_factory.mktemp("mmdet_r50_gn_v1")
    config_path = REPO / "configs" / "fcos_r50_caffe_fpn_gn_1x.py"
    config = load_config(config_path)
    config.preprocess.scale = COMPARE_SCALE
    image = write_test_image(tmp / "image.png")
    shapes = mmdet_fcos_shapes(50, gn=True, names="v1")
    sd = mmdet_checkpoint(shapes, mmdet_settings(config), image, seed=1)
    path = tmp / "fcos_r50_caffe_fpn_gn_1x_4gpu.pth"
    meta = {"mmcv_version": "0.2.7", "mmdet_version": "0.6.0+4bbb4a2", "epoch": 12, "iter": 1}
    # The 2019 files predate torch's zip format: save in the legacy pickle container
    # (docs/modes.md §2.11).
    torch.save({"meta": meta, "state_dict": sd}, path, _use_new_zipfile_serialization=False)
    output = tmp / "converted"
    proc = run_module(
        "fcos_jax.convert", "--format", "mmdet", "--config", config_path, "--input", path,
        "--output", output,
    )  # fmt: skip
    return dict(sd=sd, config=config_path, image=image, path=path, output=output, proc=proc)


# --- the tiny model on a user's folder: train.py runs of the CLI and fault tests ----------------

TINY = "configs/tiny.py"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny model's data: a user's COCO-format folder (grayscale PNGs, JPEGs, a crowd box and
    an empty image per split), 16 training images, a validation split of prime size (7)."""
    from data_helpers import user_folder

    return user_folder(tmp_path_factory.mktemp("folder"), num_train=16, num_val=7)


@pytest.fixture(scope="module")
def folder_overrides(folder):
    """configs/tiny.py on `folder`, classes and head size from the data."""
    return {
        "data.source": "coco_folder",
        "data.classes": "dataset",
        "model.head.num_classes": 0,
        "data.folder.name": "tinyfolder",
        **{f"data.folder.{k}": str(v) for k, v in folder.items()},
    }


@pytest.fixture(scope="module")
def train_command(folder_overrides):
    """command(workdir, data_dir, *flags): `train.py` of configs/tiny.py on `folder`."""
    from subprocess_cli import config_overrides

    def command(workdir, data_dir, *overrides):
        return [
            sys.executable,
            "train.py",
            f"--config={TINY}",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            "--config.train.progress_bar=False",
            *config_overrides(folder_overrides),
            *overrides,
        ]

    return command
