"""The comparison: one PyTorch checkpoint through a reference (`references.py`) and through our
model (converted in memory, or restored from disk), on the same input tensor; prints per level
the max and mean |difference| of the head outputs, then whether the detections agree."""

from pathlib import Path

import ml_collections
import numpy as np

from fcos_jax.compare.checks import (
    BOX_ATOL,
    HEAD_RTOL,
    INPUT_ATOL,
    SCORE_ATOL,
    level_differences,
    match_detections,
)
from fcos_jax.compare.errors import CompareError, ReferenceWeightsError
from fcos_jax.compare.references import REFERENCES, ReferenceRun, mmdet_settings


def report(detector, ours_input: dict[str, np.ndarray], ref: ReferenceRun) -> bool:
    """Prints the comparison of `detector` (an `inference.Detector`) and its preprocessed input
    (`detector.preprocess` output) with `ref`; returns True when everything is within
    tolerance."""
    ok = True
    if ours_input["image"].shape != ref.image.shape[1:]:
        print(f"input: our shape {ours_input['image'].shape} vs reference {ref.image.shape[1:]}")
        ok = False
    else:
        input_diff = float(np.abs(ours_input["image"] - ref.image[0]).max())
        same_geometry = tuple(ours_input["image_hw"]) == ref.image_hw and np.allclose(
            ours_input["scale"], ref.scale, rtol=1e-12, atol=0
        )
        ok &= input_diff <= INPUT_ATOL and same_geometry
        print(
            f"input {ref.image.shape[1]}x{ref.image.shape[2]} (image {ref.image_hw[0]}x"
            f"{ref.image_hw[1]}): our preprocessing max|diff| {input_diff:.2e} (tolerance "
            f"{INPUT_ATOL:.0e})" + ("" if same_geometry else "; size or scale DIFFER")
        )

    ours_levels = detector.forward(ref.image)
    print(f"{'level':>5} {'output':<11} {'max|diff|':>10} {'mean|diff|':>10} {'max|ref|':>10}")
    for level, row in enumerate(level_differences(ours_levels, ref.levels)):
        for key, (max_diff, mean_diff, ref_max) in row.items():
            within = max_diff <= HEAD_RTOL * ref_max
            ok &= within
            flag = "" if within else "  <-- above tolerance"
            print(f"{level:>5} {key:<11} {max_diff:10.3e} {mean_diff:10.3e} {ref_max:10.3e}{flag}")

    dets = detector.detect_batch(
        ref.image, np.array([ref.image_hw]), np.array([ref.scale]), np.array([ref.original_hw])
    )
    valid = dets["valid"][0]
    ours = {k: dets[k][0][valid] for k in ("boxes", "scores", "labels")}
    problems = match_detections(ours, ref.detections)
    if problems:
        ok = False
        print(f"detections DIFFER ({len(problems)} problem(s)):")
        for line in problems[:10]:
            print(f"  {line}")
    else:
        print(
            f"detections agree: {len(ref.detections['scores'])} (labels equal, boxes within "
            f"{BOX_ATOL} px, scores within {SCORE_ATOL:.0e})"
        )
    print("PASS" if ok else "FAIL")
    return ok


def compare(
    fmt: str,
    config: ml_collections.ConfigDict,
    checkpoint: str,
    image_path: str,
    converted_dir: str | None = None,
    *,
    allow_other_config_name: bool = False,
) -> bool:
    """Runs `checkpoint` (a PyTorch file of `fmt`) through the reference and our model (converted
    in memory, or restored from `converted_dir`, which must be of `config`'s name unless
    `allow_other_config_name`), prints the comparison, returns True when everything is within
    tolerance.

    An mmdetection file that `convert --to mmdet` wrote runs in the reference as the mmdetection
    3 config written next to it states (`mmdet_reference.settings_from_config`), so the config
    is checked too; mmdetection 3 has one test path, so a `mmdet_v1` config of ours runs as
    `mmdet_v3` against it. Our side pads as the references do (to a multiple of the divisor),
    whatever `data.eval_pad` says."""
    if not Path(image_path).is_file():
        raise FileNotFoundError(f"image file not found: {image_path}")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {checkpoint}")
    if fmt == "mmdet":
        mmdet_settings(config)  # a config with no mmdetection counterpart fails first
    from fcos_jax import inference
    from fcos_jax.checkpoint import store
    from fcos_jax.convert import convert_state_dict, file_classes, fit_classes, read_checkpoint

    state_dict, file_meta = read_checkpoint(checkpoint)
    if converted_dir:
        variables, meta = store.restore_inference(
            converted_dir, config, allow_other_config_name=allow_other_config_name
        )
        classes = [(int(cid), str(name)) for cid, name in meta.get("classes", [])] or None
    else:
        classes = file_classes(file_meta, checkpoint)
    config = fit_classes(config, classes, checkpoint)  # a head sized by the data takes its size
    # Converting also checks that the file fits the config (one line naming the keys if not).
    converted = convert_state_dict(state_dict, fmt, config, source=checkpoint)
    if not converted_dir:
        variables = {"params": converted.params, "batch_stats": converted.batch_stats}
    reference_options = {}
    written_config = _written_mmdet_config(file_meta, checkpoint) if fmt == "mmdet" else None
    if written_config is not None:
        reference_options["settings"] = _settings_of(written_config, state_dict)
        print(f"reference: the mmdetection 3 config {written_config}")
        if config.test.postprocess == "mmdet_v1":
            config = _as_mmdet_v3(config)
            print("mmdetection 3 has no v1 test path: our side post-processes as mmdet_v3 too")
    detector = inference.Detector(_padded_as_references(config), variables, classes)
    ours_input = detector.preprocess(image_path, image_path)  # a bad image fails here
    try:
        ref = REFERENCES[fmt](config, state_dict, image_path, **reference_options)
    except ReferenceWeightsError as error:
        raise CompareError(f"{checkpoint}: {error}") from None
    return report(detector, ours_input, ref)


def _settings_of(written_config: Path, state_dict: dict):
    """The mmdet reference's settings (`mmdet_reference.MmdetFcos`) as the mmdetection 3 config
    file states them, its widths checked against `state_dict`."""
    from fcos_jax.compare import mmdet_reference
    from fcos_jax.convert.mmdet_config import read_mmdet_config

    try:
        return mmdet_reference.settings_from_config(read_mmdet_config(written_config), state_dict)
    except mmdet_reference.MmdetReferenceError as error:
        raise CompareError(f"{written_config}: {error}") from None


def _written_mmdet_config(file_meta: dict, checkpoint: str) -> Path | None:
    """The mmdetection 3 config `convert --to mmdet` wrote next to `checkpoint` (same name, .py),
    when the file's meta says we wrote it; CompareError when it is gone."""
    from fcos_jax.convert.readers import OUR_META_KEY

    if OUR_META_KEY not in file_meta:
        return None
    path = Path(checkpoint).with_suffix(".py")
    if not path.is_file():
        raise CompareError(
            f"{checkpoint}: written by convert --to mmdet, but its mmdetection config {path} "
            "is not next to it"
        )
    return path


def _as_mmdet_v3(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with mmdetection 3's test-time conventions (docs/modes.md §1)."""
    config = config.copy_and_resolve_references()
    config.test.postprocess = "mmdet_v3"
    config.legacy_plus_one = False
    config.preprocess.scale_factor = "per_axis"
    return config


def _padded_as_references(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` padding each image to a multiple of the divisor, as the references do (canvas
    evaluation pads further, which changes outputs near the borders)."""
    if config.data.eval_pad == "multiple":
        return config
    config = config.copy_and_resolve_references()
    config.data.eval_pad = "multiple"
    return config
