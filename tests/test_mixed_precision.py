"""model.dtype = bfloat16 against float32 on a trained detector: box AP on the shapes validation
split (pycocotools), the same checkpoint evaluated both ways.

The detector is the demo's (configs/shapes.py: data, model, recipe), trained for TRAIN_STEPS
instead of 800 so the suite stays short; the full demo checkpoint's figures are in docs/training.md
(Mixed precision). bfloat16 computes convolutions and norms in bfloat16 with float32
parameters; head outputs, decoding, NMS and COCOeval are float32 either way.
"""

import numpy as np
import pytest
from subprocess_cli import run_module

from fcos_jax.config import load_config
from fcos_jax.evaluation import evaluator

TRAIN_STEPS = 300
LR_STEPS = (227, 272)  # the demo's two lr drops (x0.1 each), moved with the shorter run
AP_TOLERANCE = 0.005  # |AP(bfloat16) - AP(float32)|
MIN_AP = 0.1  # float32 AP stays above it, far from 0 and 1, so ranks and scores matter


def shapes_config(data_dir, dtype: str = "float32"):
    config = load_config("configs/shapes.py")
    config.data.data_dir = str(data_dir)
    config.model.dtype = dtype
    config.test.compilation_cache_dir = ""
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data_dir, workdir) of the demo config trained for TRAIN_STEPS."""
    root = tmp_path_factory.mktemp("mixed_precision")
    data_dir, workdir = root / "data", root / "workdir"
    proc = run_module(
        "train",
        "--config=configs/shapes.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.train.num_steps={TRAIN_STEPS}",
        f"--config.optim.lr_steps={LR_STEPS}",
        "--config.train.eval_at_end=False",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data_dir, workdir


def test_bfloat16_evaluation_gives_the_float32_ap(trained, capsys):
    data_dir, workdir = trained
    stats = {
        dtype: evaluator.evaluate_checkpoint(shapes_config(data_dir, dtype), workdir)
        for dtype in ("float32", "bfloat16")
    }
    with capsys.disabled():
        print(
            "\nshapes val box AP after "
            f"{TRAIN_STEPS} steps: float32 {stats['float32']['AP']:.4f} / AP50 "
            f"{stats['float32']['AP50']:.4f}, bfloat16 {stats['bfloat16']['AP']:.4f} / AP50 "
            f"{stats['bfloat16']['AP50']:.4f}"
        )
    assert stats["float32"]["AP"] >= MIN_AP
    assert abs(stats["bfloat16"]["AP"] - stats["float32"]["AP"]) <= AP_TOLERANCE
    assert abs(stats["bfloat16"]["AP50"] - stats["float32"]["AP50"]) <= AP_TOLERANCE
    assert np.isfinite([stats["bfloat16"][k] for k in ("AP", "AP50", "AP75")]).all()
