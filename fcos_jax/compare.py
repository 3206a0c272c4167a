"""Compare our FCOS with the PyTorch reference on one image, from the same PyTorch checkpoint.

  python -m fcos_jax.compare --format torchvision --config configs/torchvision_fcos_r50_fpn.py \
      --input fcos_resnet50_fpn_coco-99b0c9b7.pth image.jpg

torchvision: converts `--input` in memory, builds torchvision's `fcos_resnet50_fpn` with the
same weights (its transform sized by `config.preprocess.scale`), and runs both heads on the SAME
input tensor (torchvision's transformed batch, NCHW -> NHWC). Prints, per level, the max and mean
|difference| of cls_logits, bbox_reg (torchvision's relu'd output x stride) and centerness, then
whether the final detections agree (count, labels, boxes within 0.01 px, scores within 1e-4).
Exit status 0 when everything is within tolerance (per level max|diff| <= 1e-4 * max|ref|),
1 otherwise, 2 when the comparison cannot run (bad input, reference library not importable).

mmdet: needs mmdetection itself as the reference; when `import mmdet` fails it says so and exits
2 (no reference of our own stands in for it).
"""

import sys
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

_FORMAT = flags.DEFINE_enum("format", None, ["mmdet", "torchvision"], "Reference to compare with.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of our model.")
_INPUT = flags.DEFINE_string("input", None, "The PyTorch checkpoint (.pth) of the reference.")

HEAD_RTOL = 1e-4  # per level: max|ours - ref| <= HEAD_RTOL * max|ref|
BOX_ATOL = 0.01  # pixels
SCORE_ATOL = 1e-4
INPUT_ATOL = 1e-5  # our preprocessing vs the reference transform (reported, and checked)


class CompareError(Exception):
    """The comparison cannot run (exit status 2)."""


def level_differences(
    ours: list[dict[str, np.ndarray]], ref: list[dict[str, np.ndarray]]
) -> list[dict[str, tuple[float, float, float]]]:
    """Per level and output: (max|diff|, mean|diff|, max|ref|)."""
    table = []
    for level_ours, level_ref in zip(ours, ref, strict=True):
        row = {}
        for key, ref_value in level_ref.items():
            if level_ours[key].shape != ref_value.shape:
                raise CompareError(
                    f"{key}: our shape {level_ours[key].shape} vs reference {ref_value.shape}"
                )
            diff = np.abs(level_ours[key].astype(np.float64) - ref_value)
            row[key] = (float(diff.max()), float(diff.mean()), float(np.abs(ref_value).max()))
        table.append(row)
    return table


def match_detections(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> list[str]:
    """Problems found matching two detection sets (empty when they agree).

    Each reference detection must pair with one of ours of the same label, boxes within
    BOX_ATOL px and score within SCORE_ATOL (order may differ where scores nearly tie)."""
    if len(ours["scores"]) != len(ref["scores"]):
        return [f"count: ours {len(ours['scores'])} vs reference {len(ref['scores'])}"]
    problems = []
    free = np.ones(len(ours["scores"]), dtype=bool)
    for i in range(len(ref["scores"])):
        close = (
            free
            & (ours["labels"] == ref["labels"][i])
            & np.all(np.abs(ours["boxes"] - ref["boxes"][i]) <= BOX_ATOL, axis=1)
            & (np.abs(ours["scores"] - ref["scores"][i]) <= SCORE_ATOL)
        )
        if not close.any():
            problems.append(
                f"reference detection {i} (label {int(ref['labels'][i])}, score "
                f"{float(ref['scores'][i]):.5f}, box {np.round(ref['boxes'][i], 3).tolist()}) "
                "has no match"
            )
            continue
        free[np.flatnonzero(close)[0]] = False
    return problems


def _torchvision_reference(config, checkpoint: str, image_rgb: np.ndarray):
    """torchvision FCOS on one RGB image: (input NHWC, image_hw, head outputs, detections)."""
    import torch
    from torchvision.models.detection import fcos_resnet50_fpn

    from fcos_jax.convert import read_state_dict

    state_dict = {
        k: torch.from_numpy(np.asarray(v)) for k, v in read_state_dict(checkpoint).items()
    }
    long_side, short_side = max(config.preprocess.scale), min(config.preprocess.scale)
    model = fcos_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=config.model.head.num_classes,
        min_size=short_side,
        max_size=long_side,
        image_mean=list(config.preprocess.mean),
        image_std=list(config.preprocess.std),
        score_thresh=config.test.score_thr,
        nms_thresh=config.test.nms_iou,
        detections_per_img=config.test.max_per_img,
        topk_candidates=config.test.nms_pre,
    )
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise CompareError(f"{checkpoint}: does not load into torchvision FCOS: {error}") from None
    model.eval()
    tensor = torch.from_numpy(image_rgb).permute(2, 0, 1).float() / 255
    # One full-model call; its transformed input, features and head outputs are captured by hooks.
    captured = {}
    hooks = [
        model.transform.register_forward_hook(lambda m, i, o: captured.update(batch=o[0])),
        model.backbone.register_forward_hook(lambda m, i, o: captured.update(features=o)),
        model.head.register_forward_hook(lambda m, i, o: captured.update(head=o)),
    ]
    with torch.inference_mode():
        detections = model([tensor])[0]
    for hook in hooks:
        hook.remove()
    batch, head = captured["batch"], captured["head"]
    features = list(captured["features"].values())
    strides = config.model.head.strides
    sizes = [tuple(f.shape[-2:]) for f in features]
    splits = np.cumsum([h * w for h, w in sizes])[:-1]
    per_key = {
        "cls_logits": np.split(head["cls_logits"][0].numpy(), splits),
        "bbox_reg": np.split(head["bbox_regression"][0].numpy(), splits),
        "centerness": np.split(head["bbox_ctrness"][0].numpy(), splits),
    }
    levels = []
    for level, ((h, w), stride) in enumerate(zip(sizes, strides, strict=True)):
        levels.append(
            {
                "cls_logits": per_key["cls_logits"][level].reshape(1, h, w, -1),
                # the head's relu'd output is in units of the anchor size (= stride)
                "bbox_reg": per_key["bbox_reg"][level].reshape(1, h, w, 4) * np.float32(stride),
                "centerness": per_key["centerness"][level].reshape(1, h, w, 1),
            }
        )
    image = batch.tensors.permute(0, 2, 3, 1).numpy()
    dets = {
        "boxes": detections["boxes"].numpy(),
        "scores": detections["scores"].numpy(),
        "labels": detections["labels"].numpy(),
    }
    return image, tuple(batch.image_sizes[0]), levels, dets


def compare_torchvision(config, checkpoint: str, image_path: str) -> bool:
    """Prints the comparison; returns True when everything is within tolerance."""
    from fcos_jax import inference, preprocess
    from fcos_jax.convert import convert_file

    converted = convert_file(checkpoint, "torchvision", config)
    detector = inference.Detector(
        config, {"params": converted.params, "batch_stats": converted.batch_stats}
    )
    image_rgb = preprocess.load_rgb(image_path, image_path)
    ref_input, ref_hw, ref_levels, ref_dets = _torchvision_reference(config, checkpoint, image_rgb)
    ok = True

    ours_input = detector.preprocess(image_rgb, image_path)
    if ours_input["image"].shape != ref_input.shape[1:]:
        print(f"input: our shape {ours_input['image'].shape} vs reference {ref_input.shape[1:]}")
        ok = False
    else:
        input_diff = float(np.abs(ours_input["image"] - ref_input[0]).max())
        ok &= input_diff <= INPUT_ATOL and tuple(ours_input["image_hw"]) == ref_hw
        print(
            f"input {ref_input.shape[1]}x{ref_input.shape[2]} (image {ref_hw[0]}x{ref_hw[1]}): "
            f"our preprocessing max|diff| {input_diff:.2e} (tolerance {INPUT_ATOL:.0e})"
        )

    ours_levels = detector.forward(ref_input)
    print(f"{'level':>5} {'output':<11} {'max|diff|':>10} {'mean|diff|':>10} {'max|ref|':>10}")
    for level, row in enumerate(level_differences(ours_levels, ref_levels)):
        for key, (max_diff, mean_diff, ref_max) in row.items():
            within = max_diff <= HEAD_RTOL * ref_max
            ok &= within
            flag = "" if within else "  <-- above tolerance"
            print(f"{level:>5} {key:<11} {max_diff:10.3e} {mean_diff:10.3e} {ref_max:10.3e}{flag}")

    h, w = image_rgb.shape[:2]
    dets = detector.detect_batch(
        ref_input,
        np.array([ref_hw]),
        np.array([[ref_hw[0] / h, ref_hw[1] / w]]),
        np.array([[h, w]]),
    )
    valid = dets["valid"][0]
    ours = {k: dets[k][0][valid] for k in ("boxes", "scores", "labels")}
    problems = match_detections(ours, ref_dets)
    if problems:
        ok = False
        print(f"detections DIFFER ({len(problems)} problem(s)):")
        for line in problems[:10]:
            print(f"  {line}")
    else:
        print(
            f"detections agree: {len(ref_dets['scores'])} (labels equal, boxes within "
            f"{BOX_ATOL} px, scores within {SCORE_ATOL:.0e})"
        )
    print("PASS" if ok else "FAIL")
    return ok


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("give exactly one IMAGE file")
    image_path = argv[1]
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if _FORMAT.value == "mmdet":
        try:
            import mmdet  # noqa: F401
        except ImportError:
            print("compare: mmdetection is not importable here; the mmdet comparison needs it")
            sys.exit(2)
        print("compare: --format mmdet against an installed mmdetection is not implemented")
        sys.exit(2)
    from fcos_jax.cli import config_from_flag
    from fcos_jax.convert import ConversionError

    try:
        if not Path(image_path).is_file():
            raise FileNotFoundError(f"image file not found: {image_path}")
        config = config_from_flag()
        ok = compare_torchvision(config, _INPUT.value, image_path)
    except (CompareError, ConversionError, FileNotFoundError, ValueError, OSError) as error:
        print(f"compare: error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["format", "config", "input"])
    app.run(main)
