"""`python -m fcos_jax.convert --to {mmdet,torchvision}`: our checkpoints as PyTorch files.

Round trips, tensor by tensor and bit for bit: PyTorch files (random, in the exact layouts of
tests/mmdet_random.py and torchvision's own modules) -> ours -> PyTorch, and our variables ->
PyTorch -> ours for every config a builder can express. Models trained here by train.py (the
tiny test model, and the shapes architecture from scratch with BatchNorm on batch statistics)
exported to mmdetection 3 and run through the mmdet reference as the written mmdetection config
states give `Detector`'s detections by compare's rule. torchvision exports run in torchvision's
own FCOS in tests/test_torchvision_parity.py.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util
from mmdet_random import COMPARE_SCALE, mmdet_fcos_shapes, random_state_dict
from subprocess_cli import REPO, run_module

from fcos_jax import compare
from fcos_jax.checkpoint import store
from fcos_jax.config import load_config
from fcos_jax.config.classes import coco_classes
from fcos_jax.convert import (
    ConversionError,
    convert_file,
    convert_state_dict,
    export_checkpoint,
    torch_state_dict,
    write_converted,
)
from fcos_jax.convert.to_pytorch import check_expressible

CONFIGS = REPO / "configs"
ALL_CONFIGS = sorted(path.stem for path in CONFIGS.glob("*.py"))
TORCHVISION_CONFIGS = ("torchvision_fcos_r50_fpn",)
SMALL = (128, 128)  # preprocess.scale of the models trained here
# The shapes architecture from scratch (BatchNorm on batch statistics) at the tiny model's size.
# SGD as the tiny model's: AdamW's steps of about lr move the classifier too little in ten steps
# for any detection to pass the 0.05 threshold.
SHAPES_SCRATCH = {
    "data.shapes.num_train": 16,
    "data.shapes.num_val": 8,
    "data.shapes.min_side": 96,
    "data.shapes.max_side": 128,
    "preprocess.scale": SMALL,
    "augment.multiscale": (SMALL,),
    "train.batch_size": 4,
    "train.num_steps": 10,
    "train.checkpoint_every": 10,
    "train.eval_at_end": False,
    "optim.lr_steps": (),
    "optim.warmup_iters": 2,
    "optim.optimizer": "sgd",
    "optim.base_lr": 0.02,
    "optim.reference_batch": 4,
    "optim.weight_decay": 1e-4,
    "optim.bias_lr_mult": 2.0,
}


def flags(overrides: dict) -> list[str]:
    return [
        f"--config.{field}={value if isinstance(value, str) else repr(value)}"
        for field, value in overrides.items()
    ]


def flat(tree) -> dict:
    return traverse_util.flatten_dict(dict(tree), sep="/")


def worst_difference(ours: dict, theirs: dict) -> float:
    """Asserts the same keys, dtypes and shapes; returns the worst |difference|."""
    assert ours.keys() == theirs.keys(), set(ours) ^ set(theirs)
    worst = 0.0
    for key in ours:
        a, b = np.asarray(ours[key]), np.asarray(theirs[key])
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype, a.shape, b.shape)
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0)))
    return worst


def load_torch(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def numpy_dict(state_dict) -> dict:
    return {k: v.numpy() for k, v in state_dict.items()}


# --- models trained here --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model (configs/tiny.py as is) and the shapes architecture from scratch, each
    trained ten steps by train.py; the two runs start together."""
    root = tmp_path_factory.mktemp("trained")
    runs = {
        "tiny": ("tiny.py", {}),
        "shapes": ("shapes.py", SHAPES_SCRATCH),
    }
    procs = {}
    for name, (config_file, overrides) in runs.items():
        command = [
            sys.executable, "train.py", f"--config={CONFIGS / config_file}",
            f"--workdir={root / name}", f"--config.data.data_dir={root / f'{name}_data'}",
            "--config.train.progress_bar=False", *flags(overrides),
        ]  # fmt: skip
        procs[name] = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}:\n{output[-3000:]}"
    images = {
        name: sorted((root / f"{name}_data").glob("fcos_shapes/*/validation/*.jpg"))[1]
        for name in runs
    }
    return {"root": root, "images": images}


def shapes_scratch_config():
    config = load_config(CONFIGS / "shapes.py")
    config.preprocess.scale = SMALL
    return config


@pytest.fixture(scope="module")
def exported(trained):
    """tiny exported by the command line, the shapes model through the Python API."""
    root = trained["root"]
    tiny = root / "tiny_mmdet.pth"
    proc = run_module(
        "fcos_jax.convert", "--to=mmdet", f"--config={CONFIGS / 'tiny.py'}",
        f"--checkpoint={root / 'tiny'}", f"--output={tiny}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"wrote {tiny}" in proc.stdout and f"wrote {tiny.with_suffix('.py')}" in proc.stdout
    shapes = root / "shapes_mmdet.pth"
    export_checkpoint(root / "shapes", shapes_scratch_config(), "mmdet", shapes)
    return {"tiny": tiny, "shapes": shapes}


def test_tiny_model_in_the_mmdet_reference_detects_as_ours(trained, exported):
    """The one command a user runs: the exported file, as its mmdetection 3 config says, in the
    mmdet reference against our model restored from the training workdir."""
    proc = run_module(
        "fcos_jax.compare", "--format=mmdet", f"--config={CONFIGS / 'tiny.py'}",
        f"--input={exported['tiny']}", f"--checkpoint={trained['root'] / 'tiny'}",
        trained["images"]["tiny"],
    )  # fmt: skip
    print(proc.stdout)  # the per-level table (visible with -s)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        f"reference: the mmdetection 3 config {exported['tiny'].with_suffix('.py')}" in proc.stdout
    )
    assert "our preprocessing max|diff| 0.00e+00" in proc.stdout
    assert "detections agree: 100 " in proc.stdout and proc.stdout.rstrip().endswith("PASS")


def test_shapes_model_with_batch_statistics_detects_as_ours(trained, exported, capsys):
    """BatchNorm trained on batch statistics: its running averages (moved away from their
    initial 0 / 1) and a `num_batches_tracked` of the ten steps go to mmdetection's `BN`, in
    training mode there (norm_eval False)."""
    sd = load_torch(exported["shapes"])["state_dict"]
    variables, _ = store.restore_weights(trained["root"] / "shapes")
    stats = flat(variables["batch_stats"])
    np.testing.assert_array_equal(
        sd["backbone.layer2.0.downsample.1.running_var"].numpy(),
        stats["backbone/layer2_0/downsample_bn/var"],
    )
    assert np.abs(stats["backbone/bn1/mean"]).max() > 0.01
    assert np.abs(stats["backbone/bn1/var"] - 1).max() > 0.01
    counters = {k: int(v) for k, v in sd.items() if k.endswith("num_batches_tracked")}
    assert len(counters) == len(stats) // 2 and set(counters.values()) == {10}
    written = exported["shapes"].with_suffix(".py").read_text()
    assert "norm_eval=False" in written
    config = shapes_scratch_config()
    run_dir, image = trained["root"] / "shapes", trained["images"]["shapes"]
    assert compare.compare("mmdet", config, str(exported["shapes"]), str(image), str(run_dir))
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out)
    assert "detections agree: 100 " in out


@pytest.mark.parametrize("name", ["tiny", "shapes"])
def test_trained_model_comes_back_from_pytorch_bit_exact(trained, exported, name):
    """ours -> mmdetection 3 file -> ours: every variable, and the class list."""
    config = load_config(CONFIGS / "tiny.py") if name == "tiny" else shapes_scratch_config()
    converted = convert_file(exported[name], "mmdet", config)
    variables, meta = store.restore_weights(trained["root"] / name)
    for collection in ("params", "batch_stats"):
        back = flat(getattr(converted, collection))
        worst = worst_difference(back, flat(variables[collection]))
        print(f"{name}: ours -> mmdet -> ours, {collection}: worst |diff| {worst} ({len(back)})")
        assert worst == 0.0
    assert converted.classes == [tuple(c) for c in meta["classes"]]


# --- PyTorch -> ours -> PyTorch ------------------------------------------------------------------


def v3_name(key: str) -> str:
    """mmdetection v2.2+ names of the v1 predictors (docs/modes.md §3.11)."""
    return key.replace("bbox_head.fcos_", "bbox_head.conv_")


def test_mmdet_v1_file_comes_back_in_the_v3_layout_bit_exact(mmdet_r50_gn_v1, tmp_path, capsys):
    """The v1 file converted by the command line (conftest.py), exported again: the same
    tensors under mmdetection 3's names, `num_batches_tracked` included; in the reference as the
    written config states (mmdetection 3's test path) it detects as our model post-processing
    as mmdet_v3."""
    source = {v3_name(k): v.numpy() for k, v in mmdet_r50_gn_v1["sd"].items()}
    config = load_config(mmdet_r50_gn_v1["config"])
    config.preprocess.scale = COMPARE_SCALE
    output = tmp_path / "fcos_r50_gn_v3.pth"
    export_checkpoint(mmdet_r50_gn_v1["output"], config, "mmdet", output)
    written = load_torch(output)
    worst = worst_difference(numpy_dict(written["state_dict"]), source)
    print(f"mmdet v1 -> ours -> mmdet v3: worst |diff| {worst} over {len(source)} tensors")
    assert worst == 0.0
    assert list(written["meta"]["dataset_meta"]["classes"]) == [n for _, n in coco_classes()]
    image = mmdet_r50_gn_v1["image"]
    assert compare.compare("mmdet", config, str(output), str(image))
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out)
    assert "our side post-processes as mmdet_v3" in out and "detections agree" in out


def pytorch_round_trip(source: dict, fmt: str, config_name: str) -> dict:
    """`source` (a PyTorch state dict of `fmt`) -> our variables -> PyTorch again; asserts
    every tensor came back bit for bit and prints the worst difference (-s)."""
    config = load_config(CONFIGS / f"{config_name}.py")
    converted = convert_state_dict(source, fmt, config)
    variables = {"params": converted.params, "batch_stats": converted.batch_stats}
    back = torch_state_dict(variables, fmt, converted.counters, default_count=0)
    worst = worst_difference(back, source)
    print(f"{fmt} -> ours ({config_name}) -> {fmt}: worst |diff| {worst}, {len(source)} tensors")
    assert worst == 0.0
    return back


def test_mmdet_v3_file_comes_back_bit_exact():
    """The improved recipe's v3 layout (tower conv bias with GN), counters included."""
    shapes = mmdet_fcos_shapes(50, gn=True, names="v3", conv_bias=True)
    source = numpy_dict(random_state_dict(shapes, seed=11, regression="relu"))
    pytorch_round_trip(source, "mmdet", "fcos_center_normbbox_centeronreg_giou_r50_caffe_fpn_gn_1x")


def test_torchvision_file_comes_back_bit_exact_and_loads_strictly():
    build = lambda: torchvision.models.detection.fcos_resnet50_fpn(  # noqa: E731
        weights=None, weights_backbone=None, num_classes=91
    )
    # Distinct random floats and BatchNorm counters (nothing an identity).
    generator = torch.Generator().manual_seed(3)
    source = {
        k: (
            torch.randn(v.shape, generator=generator)
            if v.is_floating_point()
            else torch.randint(1, 10**6, (), generator=generator)
        ).numpy()
        for k, v in build().state_dict().items()
    }
    back = pytorch_round_trip(source, "torchvision", "torchvision_fcos_r50_fpn")
    build().load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


# --- ours -> PyTorch -> ours ---------------------------------------------------------------------


def random_variables(config, seed: int) -> dict:
    """Our variables of `config.model`, every one distinct random values (BN variances > 0)."""
    rng = np.random.default_rng(seed)
    abstract = store.abstract_variables(config.model)
    out = {}
    for collection in ("params", "batch_stats"):
        leaves = {}
        for path, leaf in flat(abstract[collection]).items():
            value = rng.standard_normal(leaf.shape, dtype=np.float32)
            leaves[path] = np.abs(value) + 0.1 if path.endswith("/var") else value
        out[collection] = traverse_util.unflatten_dict(leaves, sep="/")
    return out


CASES = [(name, "torchvision" if name in TORCHVISION_CONFIGS else "mmdet") for name in ALL_CONFIGS]


@pytest.mark.parametrize("name,fmt", CASES)
def test_our_variables_come_back_from_pytorch_bit_exact(name, fmt):
    config = load_config(CONFIGS / f"{name}.py")
    if config.model.head.num_classes == 0:  # custom_coco: as many classes as the data
        config.model.head.num_classes = 3
    check_expressible(config, fmt)
    variables = random_variables(config, seed=len(name))
    counters = {"backbone/layer1_0/bn1": 7}
    state_dict = torch_state_dict(variables, fmt, counters, default_count=2)
    bn_count = len(flat(variables["batch_stats"])) // 2
    tracked = {k: int(v) for k, v in state_dict.items() if k.endswith("num_batches_tracked")}
    assert len(tracked) == bn_count and sorted(set(tracked.values())) == [2, 7]
    converted = convert_state_dict(state_dict, fmt, config)
    assert converted.ignored == () and converted.counters.get("backbone/layer1_0/bn1") == 7
    worst = 0.0
    for collection in ("params", "batch_stats"):
        back = flat(getattr(converted, collection))
        worst = max(worst, worst_difference(back, flat(variables[collection])))
    print(f"{name}: ours -> {fmt} -> ours: worst |diff| {worst} ({len(state_dict)} tensors)")
    assert worst == 0.0


def test_dataset_classes_travel_in_the_mmdet_file(tmp_path):
    """custom_coco (the head sized by the data): the class list goes into mmdetection's
    dataset_meta and our category ids, and a config of `num_classes = 0` takes it back."""
    config = load_config(CONFIGS / "custom_coco.py")
    classes = [(3, "cat"), (7, "dog"), (12, "fox")]
    sized = config.copy_and_resolve_references()
    sized.model.head.num_classes = len(classes)
    variables = random_variables(sized, seed=1)
    converted = convert_state_dict(torch_state_dict(variables, "mmdet", {}, 0), "mmdet", sized)
    converted = dataclasses.replace(converted, classes=classes)
    write_converted(converted, tmp_path / "ours", config, "test")
    output = tmp_path / "custom.pth"
    export_checkpoint(tmp_path / "ours", config, "mmdet", output)
    meta = load_torch(output)["meta"]
    assert list(meta["dataset_meta"]["classes"]) == ["cat", "dog", "fox"]
    assert "num_classes=3" in output.with_suffix(".py").read_text()
    back = convert_file(output, "mmdet", config)
    assert back.classes == classes
    assert worst_difference(flat(back.params), flat(variables["params"])) == 0.0


# --- what cannot be written, and bad input --------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in ALL_CONFIGS if n not in TORCHVISION_CONFIGS])
def test_torchvision_cannot_express_the_other_configs(name):
    config = load_config(CONFIGS / f"{name}.py")
    with pytest.raises(ConversionError) as info:
        check_expressible(config, "torchvision")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("--to torchvision: torchvision's fcos_resnet50_fpn cannot express")
    b = config.model.backbone
    if b.style == "caffe":
        assert "model.backbone.style 'caffe'" in message
    if b.depth != 50:
        assert f"model.backbone.depth {b.depth}" in message
    if config.model.head.norm == "none":
        assert "model.head.norm 'none'" in message
    if config.model.head.regression == "exp_scale":
        assert "model.head.regression 'exp_scale'" in message


def test_mmdet_cannot_express_the_torchvision_config():
    with pytest.raises(ConversionError, match=r"^--to mmdet: .*test\.postprocess 'torchvision'"):
        check_expressible(load_config(CONFIGS / "torchvision_fcos_r50_fpn.py"), "mmdet")


@pytest.mark.parametrize("case", ["another config", "existing output", "both directions"])
def test_bad_input_exits_2_with_one_line(trained, tmp_path, case):
    tiny = trained["root"] / "tiny"
    config, output = CONFIGS / "tiny.py", tmp_path / "out.pth"
    extra = []
    if case == "another config":
        config, expected = CONFIGS / "shapes.py", f"error: {tiny}: a checkpoint of config 'tiny'"
    elif case == "existing output":
        output.with_suffix(".py").write_text("")
        expected = f"error: {output.with_suffix('.py')} already exists"
    else:
        extra, expected = ["--format=mmdet"], "error: give --format and --input"
    proc = run_module(
        "fcos_jax.convert", "--to=mmdet", f"--config={config}", f"--checkpoint={tiny}",
        f"--output={output}", *extra,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert not output.exists()


def test_output_must_be_a_pth_file(tmp_path):
    with pytest.raises(ConversionError, match="--output .*model.py: name a .pth or .pt file"):
        export_checkpoint(
            tmp_path, load_config(CONFIGS / "tiny.py"), "mmdet", tmp_path / "model.py"
        )


def test_pytorch_files_hold_only_plain_tensors(exported):
    """What `torch.load(weights_only=True)` reads: tensors, and a meta of plain values."""
    written = load_torch(exported["tiny"])
    assert set(written) == {"meta", "state_dict"}
    assert all(isinstance(v, torch.Tensor) for v in written["state_dict"].values())
    assert written["state_dict"]["bbox_head.scales.0.scale"].shape == ()
    assert written["state_dict"]["backbone.bn1.num_batches_tracked"].dtype == torch.int64
    assert written["meta"]["fcos_jax"]["config_name"] == "tiny"
    assert Path(exported["tiny"]).with_suffix(".py").is_file()
