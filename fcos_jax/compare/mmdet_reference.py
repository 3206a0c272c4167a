"""mmdetection's FCOS test path in PyTorch, written from mmdetection's semantics (no mmdetection).

`compare --format mmdet` runs a checkpoint through this and through our converted JAX model. It
never imports our model: torch.nn.functional on the mmdet state dict (v1 keys `bbox_head.fcos_*`
or v2+/v3 `bbox_head.conv_*`), with what the file cannot say given as `MmdetFcos` (the fields of
the mmdet config), stated by our config or read from an mmdetection 3 config file
(`settings_from_config`, e.g. the one `convert --to mmdet` writes). torch is imported here, so
only compare and the tests import this module.

  preprocessing    mmcv: cv2 `imread` (IMREAD_COLOR, BGR); `imrescale`: s = min(long/max(h, w),
                   short/min(h, w)), size int(side * s + 0.5), cv2 INTER_LINEAR on uint8; BGR->RGB
                   if `to_rgb`; (x - mean) / std in float32; zero pad bottom/right to /32.
  backbone         mmdet `ResNet` / `ResNeXt`: 7x7/2 stem, BN, ReLU, 3x3/2 max pool; bottlenecks
                   with the stride on the 1x1 conv1 (caffe) or the 3x3 conv2 (pytorch; grouped for
                   ResNeXt); basic blocks for depth 18/34. Every BN in eval mode with the
                   checkpoint's own running statistics (`norm_eval`, eps 1e-5).
  neck             FPN on C3-C5: 1x1 laterals, nearest x2 top-down sum, 3x3 outputs; P6 = 3x3/2
                   conv on the P5 *output* (no ReLU), P7 = 3x3/2 conv on ReLU(P6).
  head             cls and reg towers of `stacked_convs` x (3x3 conv [+ GN] + ReLU), a conv bias
                   where the file has one; centerness from the cls tower (v1) or the reg tower
                   (`centerness_on_reg`); regression exp(scale_l * x) (v1) or
                   relu(scale_l * x) * stride (`norm_on_bbox`), in input pixels.
  post-processing  'v1': 4bbb4a2 `get_bboxes_single` + `multiclass_nms` (top points by
                   max(cls * ctr), clamp to size - 1, / scale factor, raw cls > thr, score
                   cls * ctr, per-class NMS with +1 widths, best max_per_img).
                   'v3': `filter_scores_and_topk` (raw cls > thr, top (point, class) pairs),
                   clip to the size, * 1 / scale factor per axis, score cls * ctr, drop boxes
                   without area, mmcv `batched_nms` (boxes shifted by label * (max + 1)), first
                   max_per_img.
NMS suppresses IoU > threshold (float32 IoU and threshold, as the mmcv/mmdet kernels). Where
mmdetection leaves an order to an unstable sort (top-k, NMS, the final cut), equal scores go to
the lower (level, point, class) index here.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fcos_jax.models.resnet import ARCHS  # depth -> (block, blocks per stage), as mmdet has it

BN_EPS = 1e-5
GN_EPS = 1e-5
# Buffers a state dict may hold that no forward reads.
UNREAD_SUFFIXES = (".num_batches_tracked",)
POSTPROCESS_VERSIONS = ("v1", "v3")


class MmdetReferenceError(ValueError):
    """The reference cannot run: a missing or unused tensor, a bad setting or image (one line)."""


@dataclasses.dataclass(frozen=True)
class MmdetFcos:
    """What an mmdetection FCOS config says and its checkpoint does not (mmdet field names)."""

    depth: int = 50
    style: str = "caffe"  # caffe | pytorch
    groups: int = 1  # ResNeXt cardinality
    head_norm: str = "gn"  # gn | none (norm_cfg=None)
    gn_groups: int = 32
    stacked_convs: int = 4
    centerness_on_reg: bool = False
    norm_on_bbox: bool = False  # relu(scale * x) * stride instead of exp(scale * x)
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    img_scale: tuple[int, int] = (1333, 800)  # (long side max, short side)
    mean: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    to_rgb: bool = False
    size_divisor: int = 32
    postprocess: str = "v1"  # v1 | v3
    nms_pre: int = 1000
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100

    def __post_init__(self):
        checks = (
            ("depth", self.depth in ARCHS, sorted(ARCHS)),
            ("style", self.style in ("caffe", "pytorch"), ("caffe", "pytorch")),
            ("head_norm", self.head_norm in ("gn", "none"), ("gn", "none")),
            ("postprocess", self.postprocess in POSTPROCESS_VERSIONS, POSTPROCESS_VERSIONS),
        )
        for name, ok, allowed in checks:
            if not ok:
                value = getattr(self, name)
                raise MmdetReferenceError(f"{name}: expected one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One preprocessed image. image: [1, 3, Hp, Wp] float32 (padded); img_shape: (h, w) resized,
    unpadded; ori_shape: (h, w) of the file; factor: the float s of `imrescale` (v1's
    scale_factor); scale_factor_wh: (new_w / w, new_h / h), v2/v3's scale_factor."""

    image: torch.Tensor
    img_shape: tuple[int, int]
    ori_shape: tuple[int, int]
    factor: float
    scale_factor_wh: tuple[float, float]


# --------------------------------------------------------------------------------------------
# Settings from an mmdetection 3 config

_MISSING = object()


def _get(variables: Mapping[str, Any], path: str, default: Any = _MISSING) -> Any:
    """`variables['model']['neck']['out_channels']` for 'model.neck.out_channels'; mmdetection's
    default where the config leaves a field out, else MmdetReferenceError naming the field."""
    value: Any = variables
    for name in path.split("."):
        if not isinstance(value, Mapping) or name not in value:
            if default is _MISSING:
                raise MmdetReferenceError(f"mmdetection config: {path} is missing")
            return default
        value = value[name]
    return value


def _require(variables: Mapping[str, Any], path: str, allowed: tuple, default: Any = _MISSING):
    value = _get(variables, path, default)
    if value not in allowed:
        runs = " or ".join(map(repr, allowed))
        raise MmdetReferenceError(
            f"mmdetection config: {path}={value!r}; the reference runs {runs}"
        )
    return value


def settings_from_config(
    variables: Mapping[str, Any], state_dict: Mapping[str, object]
) -> MmdetFcos:
    """The settings an mmdetection 3 FCOS config states, checked against the widths of the
    checkpoint's tensors.

    variables: the config's variables (`fcos_jax.convert.mmdet_config.read_mmdet_config`):
    `model` (FCOS with ResNet/ResNeXt, FPN, FCOSHead, DetDataPreprocessor, test_cfg) and the
    `Resize` of `test_dataloader.dataset.pipeline`. Post-processing is mmdetection 3's ('v3').
    Raises MmdetReferenceError naming a field the reference cannot run, or a width (backbone
    base_channels, FPN in/out channels, head in/feat channels, num_classes) the tensors do not
    have."""
    _require(variables, "model.type", ("FCOS",))
    backbone_type = _require(variables, "model.backbone.type", ("ResNet", "ResNeXt"))
    for path, allowed, default in (
        ("model.backbone.deep_stem", (False,), False),
        ("model.backbone.avg_down", (False,), False),
        ("model.backbone.dcn", (None,), None),
        ("model.neck.type", ("FPN",), _MISSING),
        ("model.neck.start_level", (1,), 0),
        ("model.neck.add_extra_convs", ("on_output",), False),
        ("model.neck.relu_before_extra_convs", (True,), False),
        ("model.bbox_head.type", ("FCOSHead",), _MISSING),
        ("model.bbox_head.dcn_on_last_conv", (False,), False),
        ("model.test_cfg.nms.type", ("nms",), _MISSING),
    ):
        _require(variables, path, allowed, default)
    head = "model.bbox_head"
    norm_cfg = _get(variables, f"{head}.norm_cfg", {"type": "GN", "num_groups": 32})
    if norm_cfg is not None and norm_cfg.get("type") != "GN":
        raise MmdetReferenceError(f"mmdetection config: {head}.norm_cfg {norm_cfg!r}: GN or None")
    strides = tuple(_get(variables, f"{head}.strides", (4, 8, 16, 32, 64)))
    _require(variables, "model.neck.num_outs", (len(strides),))
    pipeline = _get(variables, "test_dataloader.dataset.pipeline")
    resize = [
        step for step in pipeline if isinstance(step, Mapping) and step.get("type") == "Resize"
    ]
    if len(resize) != 1 or not resize[0].get("keep_ratio"):
        raise MmdetReferenceError(
            "mmdetection config: test_dataloader.dataset.pipeline needs one Resize with keep_ratio"
        )
    preprocessor, test = "model.data_preprocessor", "model.test_cfg"
    settings = MmdetFcos(
        depth=_get(variables, "model.backbone.depth"),
        style=_get(variables, "model.backbone.style", "pytorch"),
        groups=_get(variables, "model.backbone.groups", 1) if backbone_type == "ResNeXt" else 1,
        head_norm="none" if norm_cfg is None else "gn",
        gn_groups=32 if norm_cfg is None else norm_cfg.get("num_groups", 32),
        stacked_convs=_get(variables, f"{head}.stacked_convs", 4),
        centerness_on_reg=_get(variables, f"{head}.centerness_on_reg", False),
        norm_on_bbox=_get(variables, f"{head}.norm_on_bbox", False),
        strides=strides,
        img_scale=tuple(resize[0]["scale"]),
        mean=tuple(_get(variables, f"{preprocessor}.mean")),
        std=tuple(_get(variables, f"{preprocessor}.std")),
        to_rgb=_get(variables, f"{preprocessor}.bgr_to_rgb", False),
        size_divisor=_get(variables, f"{preprocessor}.pad_size_divisor", 1),
        postprocess="v3",
        nms_pre=_get(variables, f"{test}.nms_pre", -1),
        score_thr=_get(variables, f"{test}.score_thr", 0.0),
        nms_iou=_get(variables, f"{test}.nms.iou_threshold"),
        max_per_img=_get(variables, f"{test}.max_per_img"),
    )
    _check_widths(variables, state_dict)
    return settings


def _check_widths(variables: Mapping[str, Any], state_dict: Mapping[str, object]) -> None:
    """The config's widths against the tensors' shapes (the forward reads shapes from the file,
    so these fields would otherwise go unchecked)."""
    shape = lambda key: tuple(np.shape(state_dict[key])) if key in state_dict else None  # noqa: E731
    start = _get(variables, "model.neck.start_level", 0)
    in_channels = _get(variables, "model.neck.in_channels")
    out_channels = _get(variables, "model.neck.out_channels")
    feat = _get(variables, "model.bbox_head.feat_channels", 256)
    head_in = _get(variables, "model.bbox_head.in_channels")
    predictor = "fcos_cls" if "bbox_head.fcos_cls.weight" in state_dict else "conv_cls"
    expected = {
        "backbone.conv1.weight": (
            _get(variables, "model.backbone.base_channels", 64),
            "base_channels",
        ),
        "bbox_head.cls_convs.0.conv.weight": ((feat, head_in), "feat_channels, in_channels"),
        f"bbox_head.{predictor}.weight": (
            _get(variables, "model.bbox_head.num_classes"),
            "num_classes",
        ),
    }
    for i, channels in enumerate(in_channels[start:]):
        expected[f"neck.lateral_convs.{i}.conv.weight"] = ((out_channels, channels), "FPN widths")
    for key, (want, fields) in expected.items():
        got = shape(key)
        want = want if isinstance(want, tuple) else (want,)
        if got is None or got[: len(want)] != want:
            raise MmdetReferenceError(
                f"mmdetection config: {fields} {want} do not fit {key} of shape {got}"
            )


# --------------------------------------------------------------------------------------------
# Preprocessing (mmcv imread / imrescale / imnormalize / impad_to_multiple)


def read_bgr(path: str | Path) -> np.ndarray:
    """`mmcv.imread`: [H, W, 3] uint8 BGR."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR) if Path(path).is_file() else None
    if image is None:
        raise MmdetReferenceError(f"{path}: not a readable image file")
    return image


def prepare(image_bgr: np.ndarray, settings: MmdetFcos) -> Prepared:
    """mmdet's test transform of one [H, W, 3] uint8 BGR image."""
    h, w = image_bgr.shape[:2]
    long_side, short_side = max(settings.img_scale), min(settings.img_scale)
    factor = min(long_side / max(h, w), short_side / min(h, w))
    new_w, new_h = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
    resized = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pixels = torch.from_numpy(np.ascontiguousarray(resized)).float()  # [h, w, 3]
    if settings.to_rgb:
        pixels = pixels.flip(-1)
    mean = torch.tensor(settings.mean, dtype=torch.float32)
    std = torch.tensor(settings.std, dtype=torch.float32)
    image = ((pixels - mean) / std).permute(2, 0, 1)[None]
    divisor = settings.size_divisor
    image = F.pad(image, (0, -new_w % divisor, 0, -new_h % divisor))
    return Prepared(image, (new_h, new_w), (h, w), factor, (new_w / w, new_h / h))


# --------------------------------------------------------------------------------------------
# Network


class MmdetFcosNet:
    """The network on a state dict: `forward(image)` -> per level (cls_score [1, K, H, W] logits,
    bbox_pred [1, 4, H, W] (l, t, r, b) in input pixels, centerness [1, 1, H, W] logits).

    Every tensor of the file must be read by a forward (or be an unread buffer such as
    `num_batches_tracked`): `check_all_read()` names the others."""

    def __init__(self, state_dict: Mapping[str, object], settings: MmdetFcos):
        self.sd = {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}
        self.settings = settings
        v1 = "bbox_head.fcos_cls.weight" in self.sd
        self.predictor = "bbox_head.fcos_" if v1 else "bbox_head.conv_"
        self.read: set[str] = set()

    # -- parameters ------------------------------------------------------------------------

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise MmdetReferenceError(f"the mmdet FCOS reference needs tensor {key}, not in file")
        self.read.add(key)
        return self.sd[key].float()

    def check_all_read(self) -> None:
        unread = sorted(
            k for k in self.sd if k not in self.read and not k.endswith(UNREAD_SUFFIXES)
        )
        if unread:
            more = f" (+{len(unread) - 3} more)" if len(unread) > 3 else ""
            raise MmdetReferenceError(
                f"{len(unread)} tensors not used by the mmdet FCOS reference: "
                f"{', '.join(unread[:3])}{more}"
            )

    # -- layers ----------------------------------------------------------------------------

    def conv(self, x, name: str, stride: int = 1, padding: int = 0, groups: int = 1):
        """nn.Conv2d `name`; with a bias when the file holds `name.bias`."""
        bias = self.tensor(f"{name}.bias") if f"{name}.bias" in self.sd else None
        return F.conv2d(x, self.tensor(f"{name}.weight"), bias, stride, padding, 1, groups)

    def batch_norm(self, x, name: str):
        """BN in eval mode: the checkpoint's running statistics."""
        return F.batch_norm(
            x,
            self.tensor(f"{name}.running_mean"),
            self.tensor(f"{name}.running_var"),
            self.tensor(f"{name}.weight"),
            self.tensor(f"{name}.bias"),
            training=False,
            eps=BN_EPS,
        )

    # -- backbone --------------------------------------------------------------------------

    def _bottleneck(self, x, p: str, stride: int, downsample: bool):
        s = self.settings
        stride1, stride2 = (stride, 1) if s.style == "caffe" else (1, stride)
        out = F.relu(self.batch_norm(self.conv(x, p + "conv1", stride1), p + "bn1"))
        out = self.conv(out, p + "conv2", stride2, 1, s.groups)
        out = F.relu(self.batch_norm(out, p + "bn2"))
        out = self.batch_norm(self.conv(out, p + "conv3"), p + "bn3")
        if downsample:
            x = self.batch_norm(self.conv(x, p + "downsample.0", stride), p + "downsample.1")
        return F.relu(out + x)

    def _basic_block(self, x, p: str, stride: int, downsample: bool):
        out = F.relu(self.batch_norm(self.conv(x, p + "conv1", stride, 1), p + "bn1"))
        out = self.batch_norm(self.conv(out, p + "conv2", 1, 1), p + "bn2")
        if downsample:
            x = self.batch_norm(self.conv(x, p + "downsample.0", stride), p + "downsample.1")
        return F.relu(out + x)

    def backbone(self, image: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> C2..C5 (strides 4..32)."""
        x = self.conv(image, "backbone.conv1", 2, 3)
        x = F.max_pool2d(F.relu(self.batch_norm(x, "backbone.bn1")), 3, 2, 1)
        kind, stage_blocks = ARCHS[self.settings.depth]
        block = self._bottleneck if kind == "bottleneck" else self._basic_block
        outs = []
        for i, blocks in enumerate(stage_blocks):
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                p = f"backbone.layer{i + 1}.{j}."
                x = block(x, p, stride, f"{p}downsample.0.weight" in self.sd)
            outs.append(x)
        return outs

    # -- neck and head ---------------------------------------------------------------------

    def neck(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(C3, C4, C5) -> P3..P7."""
        laterals = [self.conv(c, f"neck.lateral_convs.{i}.conv") for i, c in enumerate(inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            size = laterals[i - 1].shape[-2:]
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=size, mode="nearest"
            )
        outs = [self.conv(x, f"neck.fpn_convs.{i}.conv", 1, 1) for i, x in enumerate(laterals)]
        n = len(outs)
        outs.append(self.conv(outs[-1], f"neck.fpn_convs.{n}.conv", 2, 1))
        outs.append(self.conv(F.relu(outs[-1]), f"neck.fpn_convs.{n + 1}.conv", 2, 1))
        return outs

    def _tower(self, x, branch: str):
        s = self.settings
        for i in range(s.stacked_convs):
            x = self.conv(x, f"bbox_head.{branch}.{i}.conv", 1, 1)
            if s.head_norm == "gn":
                name = f"bbox_head.{branch}.{i}.gn"
                x = F.group_norm(
                    x,
                    s.gn_groups,
                    self.tensor(f"{name}.weight"),
                    self.tensor(f"{name}.bias"),
                    GN_EPS,
                )
            x = F.relu(x)
        return x

    def head(self, features: Sequence[torch.Tensor]):
        s, p = self.settings, self.predictor
        outputs = []
        for level, (x, stride) in enumerate(zip(features, s.strides, strict=True)):
            cls_feat, reg_feat = self._tower(x, "cls_convs"), self._tower(x, "reg_convs")
            scaled = self.conv(reg_feat, p + "reg", 1, 1) * self.tensor(
                f"bbox_head.scales.{level}.scale"
            )
            bbox_pred = F.relu(scaled) * stride if s.norm_on_bbox else scaled.exp()
            centerness = self.conv(
                reg_feat if s.centerness_on_reg else cls_feat, p + "centerness", 1, 1
            )
            outputs.append((self.conv(cls_feat, p + "cls", 1, 1), bbox_pred, centerness))
        return outputs

    @torch.inference_mode()
    def forward(self, image: torch.Tensor):
        c2, c3, c4, c5 = self.backbone(image)
        outputs = self.head(self.neck([c3, c4, c5]))
        self.check_all_read()
        return outputs


# --------------------------------------------------------------------------------------------
# Post-processing


def level_points(height: int, width: int, stride: int, postprocess: str) -> torch.Tensor:
    """[H*W, 2] (x, y), row-major. v1 `get_points_single`: arange(0, w*s, s) + s // 2; v3
    `MlvlPointGenerator(offset=0.5)`: (arange(w) + 0.5) * s."""
    if postprocess == "v1":
        xs = torch.arange(0, width * stride, stride, dtype=torch.float32)
        ys = torch.arange(0, height * stride, stride, dtype=torch.float32)
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack((x.reshape(-1), y.reshape(-1)), dim=-1) + stride // 2
    xs = ((torch.arange(width) + 0.5) * stride).float()
    ys = ((torch.arange(height) + 0.5) * stride).float()
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((x.reshape(-1), y.reshape(-1)), dim=-1)


def distance2bbox(points, distance, max_hw: tuple[int, int], minus: int) -> torch.Tensor:
    """(x - l, y - t, x + r, y + b) clamped to [0, w - minus] x [0, h - minus] (v1 minus 1)."""
    x1 = (points[:, 0] - distance[:, 0]).clamp(min=0, max=max_hw[1] - minus)
    y1 = (points[:, 1] - distance[:, 1]).clamp(min=0, max=max_hw[0] - minus)
    x2 = (points[:, 0] + distance[:, 2]).clamp(min=0, max=max_hw[1] - minus)
    y2 = (points[:, 1] + distance[:, 3]).clamp(min=0, max=max_hw[0] - minus)
    return torch.stack([x1, y1, x2, y2], -1)


def _descending(scores: torch.Tensor) -> torch.Tensor:
    """Order by descending score; equal scores keep their current (index) order."""
    return torch.sort(scores, descending=True, stable=True).indices


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_thr: float, offset: int) -> torch.Tensor:
    """Greedy NMS (mmcv `nms`, mmdet v1 kernel): indices of kept boxes by descending score.

    boxes: [N, 4] xyxy; offset 1 adds +1 to widths and heights (v1). A box is suppressed by a
    kept one with float32 IoU > float32(iou_thr)."""
    order = _descending(scores)
    b = boxes[order]
    areas = (b[:, 2] - b[:, 0] + offset) * (b[:, 3] - b[:, 1] + offset)
    threshold = torch.tensor(iou_thr, dtype=torch.float32)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = b[i + 1 :]
        w = torch.minimum(b[i, 2], rest[:, 2]) - torch.maximum(b[i, 0], rest[:, 0]) + offset
        h = torch.minimum(b[i, 3], rest[:, 3]) - torch.maximum(b[i, 1], rest[:, 1]) + offset
        inter = w.clamp(min=0) * h.clamp(min=0)
        iou = inter / (areas[i] + areas[i + 1 :] - inter)
        suppressed[i + 1 :] |= iou > threshold
    return order[torch.tensor(keep, dtype=torch.long)]


def _flatten(cls_score, bbox_pred, centerness):
    """One image's level, NCHW -> cls prob [HW, K], ltrb [HW, 4], centerness prob [HW]."""
    num_classes = cls_score.shape[1]
    scores = cls_score[0].permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
    pred = bbox_pred[0].permute(1, 2, 0).reshape(-1, 4)
    ctr = centerness[0].permute(1, 2, 0).reshape(-1).sigmoid()
    return scores, pred, ctr


def _detections(boxes, scores, labels, max_per_img: int) -> dict[str, np.ndarray]:
    """The best max_per_img by descending score (ties: candidate order), as NumPy."""
    order = _descending(scores)[:max_per_img]
    return {
        "boxes": boxes[order].numpy(),
        "scores": scores[order].numpy(),
        "labels": labels[order].numpy().astype(np.int32),
    }


def postprocess_v1(outputs, prepared: Prepared, s: MmdetFcos) -> dict[str, np.ndarray]:
    """mmdet v1 (4bbb4a2) test path. Returns boxes [N, 4] xyxy in original pixels, scores [N],
    labels [N] class channel, by descending score."""
    mlvl_boxes, mlvl_scores, mlvl_ctr = [], [], []
    for (cls_score, bbox_pred, centerness), stride in zip(outputs, s.strides, strict=True):
        scores, pred, ctr = _flatten(cls_score, bbox_pred, centerness)
        points = level_points(*cls_score.shape[-2:], stride, "v1")
        if 0 < s.nms_pre < scores.shape[0]:
            max_scores = (scores * ctr[:, None]).max(dim=1).values
            keep = _descending(max_scores)[: s.nms_pre].sort().values  # point order
            points, pred, scores, ctr = points[keep], pred[keep], scores[keep], ctr[keep]
        mlvl_boxes.append(distance2bbox(points, pred, prepared.img_shape, minus=1))
        mlvl_scores.append(scores)
        mlvl_ctr.append(ctr)
    boxes = torch.cat(mlvl_boxes) / torch.tensor(prepared.factor, dtype=torch.float32)
    scores, ctr = torch.cat(mlvl_scores), torch.cat(mlvl_ctr)
    # multiclass_nms(score_factors=centerness): one NMS per class, on candidates with raw cls
    # above the threshold, scored cls * centerness.
    num_classes = scores.shape[1]
    det_rows, det_scores, det_labels = [], [], []
    for c in range(num_classes):
        rows = torch.nonzero(scores[:, c] > s.score_thr)[:, 0]  # (level, point) order
        class_scores = scores[rows, c] * ctr[rows]
        kept = rows[nms(boxes[rows], class_scores, s.nms_iou, offset=1)]
        det_rows.append(kept)
        det_scores.append(scores[kept, c] * ctr[kept])
        det_labels.append(torch.full((len(kept),), c, dtype=torch.long))
    rows, labels = torch.cat(det_rows), torch.cat(det_labels)
    candidate_order = torch.argsort(rows * num_classes + labels)  # (level, point, class)
    rows, labels = rows[candidate_order], labels[candidate_order]
    scores = torch.cat(det_scores)[candidate_order]
    return _detections(boxes[rows], scores, labels, s.max_per_img)


def postprocess_v3(outputs, prepared: Prepared, s: MmdetFcos) -> dict[str, np.ndarray]:
    """mmdet v2.18+/v3 test path (`_predict_by_feat_single`, `_bbox_post_process`). Returns
    boxes [N, 4] xyxy in original pixels, scores [N], labels [N] class channel, by descending
    score."""
    mlvl_boxes, mlvl_scores, mlvl_labels, mlvl_ctr = [], [], [], []
    for (cls_score, bbox_pred, centerness), stride in zip(outputs, s.strides, strict=True):
        scores, pred, ctr = _flatten(cls_score, bbox_pred, centerness)
        points = level_points(*cls_score.shape[-2:], stride, "v3")
        # filter_scores_and_topk: raw cls > thr, then the top nms_pre (point, class) pairs.
        valid = torch.nonzero(scores > s.score_thr)  # [M, 2] (point, class), row-major
        top = _descending(scores[valid[:, 0], valid[:, 1]])[: s.nms_pre].sort().values
        point_idx, labels = valid[top, 0], valid[top, 1]
        mlvl_boxes.append(distance2bbox(points[point_idx], pred[point_idx], prepared.img_shape, 0))
        mlvl_scores.append(scores[point_idx, labels])
        mlvl_labels.append(labels)
        mlvl_ctr.append(ctr[point_idx])
    boxes = torch.cat(mlvl_boxes)
    # rescale: boxes * (1 / w_scale, 1 / h_scale), the factors computed in Python floats.
    w_scale, h_scale = prepared.scale_factor_wh
    boxes = boxes * torch.tensor([1 / w_scale, 1 / h_scale], dtype=torch.float32).repeat(2)
    scores = torch.cat(mlvl_scores) * torch.cat(mlvl_ctr)
    labels = torch.cat(mlvl_labels)
    nonempty = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)  # min_bbox_size 0
    boxes, scores, labels = boxes[nonempty], scores[nonempty], labels[nonempty]
    # mmcv batched_nms: one NMS over boxes shifted by label * (max coordinate + 1).
    if len(boxes):
        shifted = boxes + (labels.to(boxes) * (boxes.max() + 1))[:, None]
        kept = nms(shifted, scores, s.nms_iou, offset=0)
    else:
        kept = torch.zeros(0, dtype=torch.long)
    return _detections(boxes[kept], scores[kept], labels[kept], s.max_per_img)


POSTPROCESS = {"v1": postprocess_v1, "v3": postprocess_v3}


# --------------------------------------------------------------------------------------------
# One image, end to end


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
    """prepared: the network input and geometry; outputs: per level (cls_score, bbox_pred,
    centerness) NCHW (see `MmdetFcosNet`); detections: boxes [N, 4] xyxy in original pixels,
    scores [N], labels [N] int32 class channel, by descending score."""

    prepared: Prepared
    outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    detections: dict[str, np.ndarray]


def run(
    state_dict: Mapping[str, object], settings: MmdetFcos, image_path: str | Path
) -> ReferenceRun:
    """The mmdet test path of `settings` for one image file with the weights of `state_dict`."""
    prepared = prepare(read_bgr(image_path), settings)
    try:
        outputs = MmdetFcosNet(state_dict, settings).forward(prepared.image)
    except RuntimeError as error:  # a tensor shape that does not fit the settings
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise MmdetReferenceError(
            f"the checkpoint does not fit the mmdet FCOS settings ({detail})"
        ) from None
    detections = POSTPROCESS[settings.postprocess](outputs, prepared, settings)
    return ReferenceRun(prepared, outputs, detections)
