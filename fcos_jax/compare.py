"""Compare our FCOS with a PyTorch reference on one image, from the same PyTorch checkpoint.

  python -m fcos_jax.compare --format mmdet --config configs/fcos_r50_caffe_fpn_gn_1x.py \
      --input fcos_r50_caffe_fpn_gn_1x_4gpu_20190516-9f253a93.pth image.jpg
  python -m fcos_jax.compare --format torchvision --config configs/torchvision_fcos_r50_fpn.py \
      --input fcos_resnet50_fpn_coco-99b0c9b7.pth image.jpg

Our side converts `--input` in memory, or restores `--checkpoint DIR` (a converted checkpoint or
training workdir) to check what is on disk against the original file. The reference:
  mmdet        `fcos_jax.mmdet_reference`: mmdetection's FCOS test path written in torch from
               mmdetection's semantics (no mmdetection needed), on the file's tensors, with the
               architecture, preprocessing and post-processing (`test.postprocess` mmdet_v1 or
               mmdet_v3) the config states.
  torchvision  torchvision's `fcos_resnet50_fpn` with the file's weights, its transform sized by
               `config.preprocess.scale`.
Both heads run on the SAME input tensor (the reference's preprocessed image, NCHW -> NHWC), and
our preprocessing is checked against it. Prints, per level, the max and mean |difference| of
cls_logits, bbox_reg (l, t, r, b in input pixels) and centerness, then whether the final
detections agree (count, labels, boxes within 0.01 px, scores within 1e-4).
Exit status 0 when everything is within tolerance (per level max|diff| <= 1e-4 * max|ref|),
1 otherwise, 2 with one line `error: ...` when the comparison cannot run (bad input).
"""

import dataclasses
import sys
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from fcos_jax import cli

_FORMAT = flags.DEFINE_enum("format", None, ["mmdet", "torchvision"], "Reference to compare with.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config of our model.")
_INPUT = flags.DEFINE_string("input", None, "The PyTorch checkpoint (.pth) of the reference.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Our side from this converted checkpoint or workdir (default: --input converted in memory).",
)

HEAD_RTOL = 1e-4  # per level: max|ours - ref| <= HEAD_RTOL * max|ref|
BOX_ATOL = 0.01  # pixels
SCORE_ATOL = 1e-4
INPUT_ATOL = 1e-5  # our preprocessing vs the reference transform (reported, and checked)
OUTPUT_KEYS = ("cls_logits", "bbox_reg", "centerness")


class CompareError(Exception):
    """The comparison cannot run (exit status 2)."""


class ReferenceWeightsError(CompareError):
    """The reference cannot run the checkpoint's tensors (the message lacks the file name)."""


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
    """What a reference computed on one image.

    image: [1, Hp, Wp, 3] float32 network input (NHWC); image_hw: (h, w) resized, unpadded;
    scale: (y, x) factors, original pixels = resized pixels / scale; original_hw: (h, w);
    levels: per level {cls_logits [1, H, W, K], bbox_reg [1, H, W, 4] pixels, centerness
    [1, H, W, 1]} float32; detections: boxes [N, 4] xyxy original pixels, scores [N], labels [N]."""

    image: np.ndarray
    image_hw: tuple[int, int]
    scale: tuple[float, float]
    original_hw: tuple[int, int]
    levels: list[dict[str, np.ndarray]]
    detections: dict[str, np.ndarray]


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


# --------------------------------------------------------------------------------------------
# References


def _torchvision_reference(config, state_dict, image_path: str) -> ReferenceRun:
    """torchvision FCOS on one image file, its head outputs captured by hooks."""
    try:
        import torch
        from torchvision.models.detection import fcos_resnet50_fpn
    except ImportError as error:
        raise CompareError(f"torchvision is not importable: {error}") from None

    from fcos_jax import preprocess

    image_rgb = preprocess.load_rgb(image_path, image_path)
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
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    except RuntimeError as error:
        raise ReferenceWeightsError(f"does not load into torchvision FCOS: {error}") from None
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
    image_hw = tuple(int(v) for v in batch.image_sizes[0])
    original_hw = image_rgb.shape[:2]
    return ReferenceRun(
        image=batch.tensors.permute(0, 2, 3, 1).numpy(),
        image_hw=image_hw,
        scale=(image_hw[0] / original_hw[0], image_hw[1] / original_hw[1]),
        original_hw=original_hw,
        levels=levels,
        detections={k: detections[k].numpy() for k in ("boxes", "scores", "labels")},
    )


def mmdet_settings(config: ml_collections.ConfigDict):
    """The mmdet config fields (`mmdet_reference.MmdetFcos`) our config stands for.

    Raises CompareError for a config with no mmdetection counterpart."""
    from fcos_jax import mmdet_reference

    b, h, p, t = config.model.backbone, config.model.head, config.preprocess, config.test
    unsupported = [
        (p.resize != "mmdet", f"preprocess.resize {p.resize!r} (mmdetection resizes as 'mmdet')"),
        (p.unit_range, "preprocess.unit_range (mmdetection never divides pixels by 255)"),
        (
            h.regression == "relu_stride",
            "model.head.regression 'relu_stride' (torchvision's; mmdetection's head has Scale)",
        ),
        (
            t.postprocess not in ("mmdet_v1", "mmdet_v3"),
            f"test.postprocess {t.postprocess!r} (mmdetection's are mmdet_v1 and mmdet_v3)",
        ),
    ]
    problems = [message for bad, message in unsupported if bad]
    if problems:
        raise CompareError(f"--format mmdet: {'; '.join(problems)}")
    return mmdet_reference.MmdetFcos(
        depth=b.depth,
        style=b.style,
        groups=b.groups,
        head_norm=h.norm,
        gn_groups=h.gn_groups,
        stacked_convs=h.stacked_convs,
        centerness_on_reg=h.centerness_on_reg,
        norm_on_bbox=h.regression == "scale_relu_stride",
        strides=tuple(h.strides),
        img_scale=tuple(p.scale),
        mean=tuple(p.mean),
        std=tuple(p.std),
        to_rgb=p.to_rgb,
        size_divisor=p.size_divisor,
        postprocess=t.postprocess.removeprefix("mmdet_"),
        nms_pre=t.nms_pre,
        score_thr=t.score_thr,
        nms_iou=t.nms_iou,
        max_per_img=t.max_per_img,
    )


def _mmdet_reference(config, state_dict, image_path: str) -> ReferenceRun:
    """`fcos_jax.mmdet_reference` on one image file."""
    from fcos_jax import mmdet_reference

    settings = mmdet_settings(config)
    try:
        run = mmdet_reference.run(state_dict, settings, image_path)
    except mmdet_reference.MmdetReferenceError as error:
        raise ReferenceWeightsError(str(error)) from None
    prepared = run.prepared
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    if settings.postprocess == "v1":  # v1 divides by the one float scale factor
        scale = (prepared.factor, prepared.factor)
    else:
        w_scale, h_scale = prepared.scale_factor_wh
        scale = (h_scale, w_scale)
    return ReferenceRun(
        image=nhwc(prepared.image),
        image_hw=prepared.img_shape,
        scale=scale,
        original_hw=prepared.ori_shape,
        levels=[dict(zip(OUTPUT_KEYS, map(nhwc, level), strict=True)) for level in run.outputs],
        detections=run.detections,
    )


REFERENCES = {"mmdet": _mmdet_reference, "torchvision": _torchvision_reference}


# --------------------------------------------------------------------------------------------
# The comparison


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
) -> bool:
    """Runs `checkpoint` (a PyTorch file of `fmt`) through the reference and our model (converted
    in memory, or restored from `converted_dir`), prints the comparison, returns True when
    everything is within tolerance."""
    if not Path(image_path).is_file():
        raise FileNotFoundError(f"image file not found: {image_path}")
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {checkpoint}")
    if fmt == "mmdet":
        mmdet_settings(config)  # a config with no mmdetection counterpart fails first
    from fcos_jax import checkpoint as checkpoint_lib
    from fcos_jax import inference
    from fcos_jax.convert import convert_state_dict, read_state_dict

    state_dict = read_state_dict(checkpoint)
    # Converting also checks that the file fits the config (one line naming the keys if not).
    converted = convert_state_dict(state_dict, fmt, config, source=checkpoint)
    if converted_dir:
        variables, meta = checkpoint_lib.restore_inference(converted_dir, config)
        classes = [(int(cid), str(name)) for cid, name in meta.get("classes", [])] or None
    else:
        variables = {"params": converted.params, "batch_stats": converted.batch_stats}
        classes = None
    detector = inference.Detector(config, variables, classes)
    ours_input = detector.preprocess(image_path, image_path)  # a bad image fails here
    try:
        ref = REFERENCES[fmt](config, state_dict, image_path)
    except ReferenceWeightsError as error:
        raise CompareError(f"{checkpoint}: {error}") from None
    return report(detector, ours_input, ref)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("give exactly one IMAGE file")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    ok = compare(_FORMAT.value, cli.config_from_flag(), _INPUT.value, argv[1], _CHECKPOINT.value)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["format", "config", "input"])  # cli.run: exit 2 if missing
    cli.run(main, errors=(CompareError,))
