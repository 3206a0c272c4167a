"""The mmdetection 3 config of one of our models: built, written as Python, and read back.

`mmdet_config` states our config in mmdetection 3's field names (mmdet `FCOS`, `ResNet` or
`ResNeXt`, `FPN`, `FCOSHead`, `DetDataPreprocessor`, the test pipeline's `Resize`); `render`
writes it as a self-contained config file (no `_base_`), which mmengine's `Config.fromfile`
reads and `mmdet.apis.init_detector` builds. `read_mmdet_config` reads such a file back without
running it: only assignments of literals and `dict(...)` calls are accepted, so a config next to
a checkpoint is as safe to read as the checkpoint (`torch.load(weights_only=True)`).

mmdetection 3 has one test path: a `mmdet_v1` config's model is written with mmdetection 3's
post-processing (its thresholds, NMS and top-k; docs/porting.md says what changes).
"""

import ast
from pathlib import Path
from typing import Any

import ml_collections

from fcos_jax.config.classes import ClassList
from fcos_jax.convert.errors import ConversionError
from fcos_jax.models.resnet import ARCHS

MmdetConfig = dict[str, Any]  # variable name -> value (dicts, lists, tuples, scalars)


def mmdet_config(config: ml_collections.ConfigDict, classes: ClassList) -> MmdetConfig:
    """The variables of the mmdetection 3 config (`default_scope`, `model`, `test_dataloader`)
    that builds, preprocesses and post-processes as `config` does, for a head of
    `len(classes)` channels. The config must pass `expressible.mmdet_problems`."""
    b, f, h, p, t = (
        config.model.backbone,
        config.model.fpn,
        config.model.head,
        config.preprocess,
        config.test,
    )
    expansion = 4 if ARCHS[b.depth][0] == "bottleneck" else 1
    backbone = {"type": "ResNeXt" if b.groups > 1 else "ResNet", "depth": b.depth}
    if b.groups > 1:
        backbone.update(groups=b.groups, base_width=b.base_width)
    frozen_bn = b.norm == "frozen_bn"
    backbone.update(
        base_channels=b.stem_width,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=b.frozen_stages,
        # frozen_bn: running statistics never updated (norm_eval); batch_stats_bn: BN trained on
        # batch statistics (ours normalises over the global batch: SyncBN on several GPUs).
        norm_cfg={"type": "BN", "requires_grad": bool(b.norm_trainable)},
        norm_eval=frozen_bn,
        style=b.style,
    )
    neck = {
        "type": "FPN",
        "in_channels": [b.stem_width * 2**i * expansion for i in range(4)],
        "out_channels": f.out_channels,
        "start_level": 1,  # C3-C5
        "add_extra_convs": "on_output",  # P6 from the P5 output
        "num_outs": len(h.strides),
        "relu_before_extra_convs": True,  # P7 from ReLU(P6)
    }
    bbox_head = {
        "type": "FCOSHead",
        "num_classes": len(classes),
        "in_channels": f.out_channels,
        "stacked_convs": h.stacked_convs,
        "feat_channels": h.feat_channels,
        "strides": list(h.strides),
        "regress_ranges": tuple(tuple(r) for r in config.targets.regress_ranges),
        "center_sampling": bool(config.targets.center_sampling),
        "center_sample_radius": float(config.targets.center_sample_radius),
        "norm_on_bbox": h.regression == "scale_relu_stride",
        "centerness_on_reg": bool(h.centerness_on_reg),
        "conv_bias": bool(h.conv_bias) or h.norm == "none",
        "norm_cfg": (
            {"type": "GN", "num_groups": h.gn_groups, "requires_grad": True}
            if h.norm == "gn"
            else None
        ),
        "loss_cls": {
            "type": "FocalLoss",
            "use_sigmoid": True,
            "gamma": float(config.loss.focal_gamma),
            "alpha": float(config.loss.focal_alpha),
            "loss_weight": 1.0,
        },
        "loss_bbox": {
            "type": "GIoULoss" if config.loss.bbox_loss == "giou" else "IoULoss",
            "loss_weight": 1.0,
        },
        "loss_centerness": {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0},
    }
    test_cfg = {
        "nms_pre": t.nms_pre,
        "min_bbox_size": 0,
        "score_thr": float(t.score_thr),
        "nms": {"type": "nms", "iou_threshold": float(t.nms_iou)},
        "max_per_img": t.max_per_img,
    }
    data_preprocessor = {
        "type": "DetDataPreprocessor",
        "mean": [float(v) for v in p.mean],
        "std": [float(v) for v in p.std],
        "bgr_to_rgb": bool(p.to_rgb),
        "pad_size_divisor": p.size_divisor,
    }
    pipeline = [
        {"type": "LoadImageFromFile"},
        {"type": "Resize", "scale": tuple(p.scale), "keep_ratio": True},
        {
            "type": "PackDetInputs",
            "meta_keys": ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
        },
    ]
    return {
        "default_scope": "mmdet",
        "model": {
            "type": "FCOS",
            "data_preprocessor": data_preprocessor,
            "backbone": backbone,
            "neck": neck,
            "bbox_head": bbox_head,
            "test_cfg": test_cfg,
        },
        "test_dataloader": {
            "batch_size": 1,
            "num_workers": 2,
            "sampler": {"type": "DefaultSampler", "shuffle": False},
            "dataset": {
                "type": "CocoDataset",
                "metainfo": {"classes": tuple(name for _, name in classes)},
                "pipeline": pipeline,
                "test_mode": True,
            },
        },
    }


def render(variables: MmdetConfig, header: str) -> str:
    """`variables` as a Python config file: `header` as comment lines, then one assignment per
    variable, dicts written as `dict(key=value, ...)` as mmdetection's configs are."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines.append("")
    for name, value in variables.items():
        lines.append(f"{name} = {_python(value, 0)}")
    return "\n".join(lines) + "\n"


INLINE_WIDTH = 88  # a dict without dicts inside that fits this width is written on one line


def _python(value: Any, indent: int) -> str:
    inner = " " * (indent + 4)
    if isinstance(value, dict):
        flat = not any(isinstance(item, dict | list) for item in value.values())
        inline = "dict(" + ", ".join(f"{k}={_python(v, 0)}" for k, v in value.items()) + ")"
        if flat and indent + len(inline) <= INLINE_WIDTH:
            return inline
        items = [f"{inner}{key}={_python(item, indent + 4)}," for key, item in value.items()]
        return "dict(\n" + "\n".join(items) + "\n" + " " * indent + ")"
    if isinstance(value, list | tuple):
        parts = [_python(item, indent + 4) for item in value]
        open_, close = ("[", "]") if isinstance(value, list) else ("(", ")")
        if len(value) == 1 and isinstance(value, tuple):
            close = ",)"
        inline = open_ + ", ".join(parts) + close
        if any(isinstance(item, dict) for item in value) or indent + len(inline) > INLINE_WIDTH:
            body = "\n".join(f"{inner}{part}," for part in parts)
            return f"{open_}\n{body}\n{' ' * indent}{close.lstrip(',')}"
        return inline
    if isinstance(value, bool | int | float | str) or value is None:
        return repr(value)
    raise TypeError(f"no config literal for {type(value).__name__}")


def read_mmdet_config(path: str | Path) -> MmdetConfig:
    """The variables of an mmdetection config file made of literal assignments (as `render`
    writes), read without running it. Raises ConversionError naming the file and line of
    anything else (an import, a call other than dict(...), `_base_` inheritance, ...)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such mmdetection config file")
    try:
        tree = ast.parse(path.read_text(), str(path))
    except SyntaxError as error:
        raise ConversionError(f"{path}: not Python ({error.msg}, line {error.lineno})") from None
    variables = {}
    for statement in tree.body:
        targets = getattr(statement, "targets", [])
        if not isinstance(statement, ast.Assign) or len(targets) != 1:
            raise ConversionError(f"{path}:{statement.lineno}: not a plain assignment")
        if not isinstance(targets[0], ast.Name):
            raise ConversionError(f"{path}:{statement.lineno}: not a plain assignment")
        if targets[0].id == "_base_":
            raise ConversionError(f"{path}:{statement.lineno}: inherits (_base_); give a flat one")
        variables[targets[0].id] = _literal(statement.value, path)
    return variables


def _literal(node: ast.expr, path: Path) -> Any:
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args):
            raise ConversionError(f"{path}:{node.lineno}: only dict(key=value) calls are read")
        return {keyword.arg: _literal(keyword.value, path) for keyword in node.keywords}
    if isinstance(node, ast.List | ast.Tuple):
        items = [_literal(item, path) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {
            _literal(k, path): _literal(v, path)
            for k, v in zip(node.keys, node.values, strict=True)
        }
    try:
        return ast.literal_eval(node)  # constants, negative numbers
    except ValueError:
        raise ConversionError(f"{path}:{node.lineno}: not a literal value") from None
