"""Name maps between PyTorch state-dict keys and our Flax variable tree, one table per format.

The tables serve both directions: importing (`core.py`) and writing PyTorch files
(`to_pytorch.py`). A rule maps a target *module* path (regex over `backbone/layer2_0/conv1`, ...)
to the source module name (a `re` template, several candidates, or a function of the match) and
says which kind of layer it is; the kind fixes the leaf names and the tensor layout change:
  conv   kernel <- weight (OIHW -> HWIO, grouped [O, I/g, kh, kw] -> [kh, kw, I/g, O]), bias <- bias
  norm   scale <- weight, bias <- bias, batch_stats mean/var <- running_mean/running_var
         (a BN's `num_batches_tracked` is no model variable: `COUNTER`)
  scale  scale <- scale (0-dim)
Of several candidate names the first is the current spelling, the one written. No table rotates
or reorders class channels (docs/modes.md §2.11: mmdet's upgrade_model_version bug).
"""

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from fcos_jax.convert.errors import ConversionError

CONV, NORM, SCALE = "conv", "norm", "scale"

# Target leaf name -> source leaf name, per layer kind.
LEAVES = {
    CONV: {"kernel": "weight", "bias": "bias"},
    NORM: {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"},
    SCALE: {"scale": "scale"},
}
# torch's BatchNorm2d counts its training batches in this buffer; no forward reads it (with the
# default momentum), so it is no model variable. Imported counts travel in the checkpoint's meta
# and are written back on export (`core.Converted.counters`).
COUNTER = "num_batches_tracked"
# Source leaves of a mapped module that are no model variable.
IGNORED_LEAVES = {CONV: (), NORM: (COUNTER,), SCALE: ()}

SourceName = str | tuple[str, ...] | Callable[[re.Match], str]


@dataclasses.dataclass(frozen=True)
class Rule:
    target: str  # regex, full match over the target module path
    source: SourceName  # `re` template(s) of the source module name; first present one wins
    kind: str  # CONV, NORM or SCALE

    def source_candidates(self, match: re.Match) -> tuple[str, ...]:
        if callable(self.source):
            return (self.source(match),)
        names = (self.source,) if isinstance(self.source, str) else self.source
        return tuple(match.expand(name) for name in names)


@dataclasses.dataclass(frozen=True)
class NameMap:
    rules: tuple[Rule, ...]
    ignored: tuple[str, ...]  # source keys dropped on purpose
    parts: tuple[str, ...]  # top-level target parts this format fills
    description: str

    def lookup(self, module: str) -> tuple[str, tuple[str, ...]]:
        """(layer kind, source module names, current spelling first) of our `module` path."""
        for rule in self.rules:
            match = re.fullmatch(rule.target, module)
            if match:
                return rule.kind, rule.source_candidates(match)
        raise ConversionError(f"no {self.description} name rule for our module {module}")


def source_leaf(kind: str, leaf: str, where: str) -> str:
    """The PyTorch leaf name of our `leaf` of a `kind` layer (`where` names it in errors)."""
    name = LEAVES[kind].get(leaf)
    if name is None:
        raise ConversionError(f"no PyTorch name for our {where}")
    return name


def torch_shape(kind: str, leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of our variable of `shape` (a conv kernel HWIO -> OIHW)."""
    if kind == CONV and leaf == "kernel":
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    return tuple(shape)


def to_ours(kind: str, leaf: str, array: np.ndarray) -> np.ndarray:
    """A PyTorch tensor's values in our layout, float32 (a conv kernel OIHW -> HWIO)."""
    if kind == CONV and leaf == "kernel":
        array = np.transpose(array, (2, 3, 1, 0))  # grouped: I is I/groups
    return np.array(array, dtype=np.float32, order="C")  # (ascontiguousarray makes 0-dim 1-dim)


def to_torch(kind: str, leaf: str, array: np.ndarray) -> np.ndarray:
    """Our variable's values in PyTorch's layout, float32 (a conv kernel HWIO -> OIHW)."""
    if kind == CONV and leaf == "kernel":
        array = np.transpose(array, (3, 2, 0, 1))
    return np.array(array, dtype=np.float32, order="C")


def _resnet(prefix: str) -> tuple[Rule, ...]:
    """mmdet / torchvision ResNet and ResNeXt module names under `prefix`."""
    layer = prefix + r"layer\1.\2"
    return (
        Rule(r"backbone/conv1", prefix + "conv1", CONV),
        Rule(r"backbone/bn1", prefix + "bn1", NORM),
        Rule(r"backbone/layer(\d+)_(\d+)/downsample_conv", layer + ".downsample.0", CONV),
        Rule(r"backbone/layer(\d+)_(\d+)/downsample_bn", layer + ".downsample.1", NORM),
        Rule(r"backbone/layer(\d+)_(\d+)/(conv\d)", layer + r".\3", CONV),
        Rule(r"backbone/layer(\d+)_(\d+)/(bn\d)", layer + r".\3", NORM),
    )


def _torchvision_tower(branch: str, offset: int) -> Callable[[re.Match], str]:
    # torchvision's towers are Sequential(conv, GN, ReLU) x 4: conv at 3i, GN at 3i + 1.
    return lambda m: f"head.{branch}.conv.{3 * int(m[1]) + offset}"


MMDET = NameMap(
    rules=_resnet("backbone.")
    + (
        Rule(r"neck/(lateral_convs|fpn_convs)_(\d+)", r"neck.\1.\2.conv", CONV),
        Rule(r"bbox_head/(cls_convs|reg_convs)_(\d+)/conv", r"bbox_head.\1.\2.conv", CONV),
        Rule(r"bbox_head/(cls_convs|reg_convs)_(\d+)/gn", r"bbox_head.\1.\2.gn", NORM),
        # v2.2+ `conv_cls/reg/centerness` (written), v1 `fcos_cls/reg/centerness` (same tensors).
        Rule(
            r"bbox_head/conv_(cls|reg|centerness)",
            (r"bbox_head.conv_\1", r"bbox_head.fcos_\1"),
            CONV,
        ),
        Rule(r"bbox_head/scales_(\d+)", r"bbox_head.scales.\1", SCALE),
    ),
    ignored=(),
    parts=("backbone", "neck", "bbox_head"),
    description="mmdetection v1/v2/v3 FCOS",
)

TORCHVISION = NameMap(
    rules=_resnet("backbone.body.")
    + (
        Rule(r"neck/lateral_convs_(\d+)", r"backbone.fpn.inner_blocks.\1.0", CONV),
        Rule(r"neck/fpn_convs_([0-2])", r"backbone.fpn.layer_blocks.\1.0", CONV),
        Rule(r"neck/fpn_convs_3", "backbone.fpn.extra_blocks.p6", CONV),
        Rule(r"neck/fpn_convs_4", "backbone.fpn.extra_blocks.p7", CONV),
        Rule(r"bbox_head/cls_convs_(\d+)/conv", _torchvision_tower("classification_head", 0), CONV),
        Rule(r"bbox_head/cls_convs_(\d+)/gn", _torchvision_tower("classification_head", 1), NORM),
        Rule(r"bbox_head/reg_convs_(\d+)/conv", _torchvision_tower("regression_head", 0), CONV),
        Rule(r"bbox_head/reg_convs_(\d+)/gn", _torchvision_tower("regression_head", 1), NORM),
        Rule(r"bbox_head/conv_cls", "head.classification_head.cls_logits", CONV),
        Rule(r"bbox_head/conv_reg", "head.regression_head.bbox_reg", CONV),
        Rule(r"bbox_head/conv_centerness", "head.regression_head.bbox_ctrness", CONV),
    ),
    ignored=(),
    parts=("backbone", "neck", "bbox_head"),
    description="torchvision fcos_resnet50_fpn",
)

BACKBONE = NameMap(
    rules=_resnet(""),
    # ImageNet classifier; the unused stem bias of some caffe conversions (docs/modes.md §2.2).
    ignored=("fc.weight", "fc.bias", "conv1.bias"),
    parts=("backbone",),
    description="ImageNet ResNet/ResNeXt backbone (mmdet caffe or torchvision layout)",
)

FORMATS = {"mmdet": MMDET, "torchvision": TORCHVISION, "backbone": BACKBONE}

# A key that only one format's files have, to suggest the right --format.
_SIGNATURES = (
    ("mmdet", re.compile(r"^bbox_head\.")),
    ("torchvision", re.compile(r"^head\.classification_head\.")),
    ("backbone", re.compile(r"^layer1\.0\.conv1\.weight$")),
)


def guess_format(keys: list[str]) -> str | None:
    """The format whose signature key appears in `keys`, if exactly one does."""
    found = {fmt for fmt, pattern in _SIGNATURES if any(pattern.search(k) for k in keys)}
    return found.pop() if len(found) == 1 else None
