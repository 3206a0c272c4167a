"""The PyTorch references a comparison runs on one image, and what they return (`ReferenceRun`).

  mmdet        `mmdet_reference.py`: mmdetection's FCOS test path written in torch from
               mmdetection's semantics (no mmdetection needed), on the file's tensors, with the
               architecture, preprocessing and post-processing (`test.postprocess` mmdet_v1 or
               mmdet_v3) the config states.
  torchvision  torchvision's `fcos_resnet50_fpn` with the file's weights, its transform sized by
               `config.preprocess.scale`.

torch is imported when a reference runs, not with this module.
"""

import dataclasses

import ml_collections
import numpy as np

from fcos_jax.compare.errors import CompareError, ReferenceWeightsError
from fcos_jax.config.groups import kwargs_for
from fcos_jax.convert.expressible import mmdet_problems

OUTPUT_KEYS = ("cls_logits", "bbox_reg", "centerness")


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


def _torchvision_reference(config, state_dict, image_path: str) -> ReferenceRun:
    """torchvision FCOS on one image file, its head outputs captured by hooks."""
    try:
        import torch
        from torchvision.models.detection import fcos_resnet50_fpn
    except ImportError as error:
        raise CompareError(f"torchvision is not importable: {error}") from None

    from fcos_jax.data import preprocess

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
    from fcos_jax.compare import mmdet_reference

    problems = mmdet_problems(config)
    if problems:
        raise CompareError(f"--format mmdet: {'; '.join(problems)}")
    b, h, p, t = config.model.backbone, config.model.head, config.preprocess, config.test
    # The fields named alike in mmdetection and our groups are read by name; these four differ.
    settings = kwargs_for(
        mmdet_reference.MmdetFcos,
        b,
        h,
        p,
        t,
        head_norm=h.norm,
        norm_on_bbox=h.regression == "scale_relu_stride",
        img_scale=tuple(p.scale),
        postprocess=t.postprocess.removeprefix("mmdet_"),
    )
    return mmdet_reference.MmdetFcos(**settings)


def _mmdet_reference(config, state_dict, image_path: str, settings=None) -> ReferenceRun:
    """`mmdet_reference.run` on one image file, with `settings` (`MmdetFcos`, e.g. from a written
    mmdetection 3 config) or those `config` stands for."""
    from fcos_jax.compare import mmdet_reference

    settings = settings or mmdet_settings(config)
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
