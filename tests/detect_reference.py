"""Plain-Python references of the detection test paths (docs/modes.md §2.5, §3.5, §4.5 and §5),
written with loops over float32 scalars, and random head outputs that exercise them.
Shared by the tests of `fcos_jax.detection.postprocess`, `fcos_jax.detection.nms` and
`fcos_jax.compare.mmdet_reference`."""

import math

import jax
import numpy as np

STRIDES = (8, 16, 32, 64, 128)
PADDED_HW = (64, 96)
F32 = np.float32


def sigmoid(x: np.ndarray) -> np.ndarray:
    # Probabilities come from the same elementwise sigmoid as the code under test so that the
    # comparisons below can be exact; sigmoid itself is not what is tested here.
    return np.asarray(jax.nn.sigmoid(x))


def iou_reference(a, b, plus_one: float) -> np.float32:
    """IoU of two boxes as the NMS kernels compute it, in float32 scalars."""
    o, zero = F32(plus_one), F32(0)
    w = max(min(a[2], b[2]) - max(a[0], b[0]) + o, zero)
    h = max(min(a[3], b[3]) - max(a[1], b[1]) + o, zero)
    inter = w * h
    area_a = (a[2] - a[0] + o) * (a[3] - a[1] + o)
    area_b = (b[2] - b[0] + o) * (b[3] - b[1] + o)
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area_a + area_b - inter)


def shift_by_label(cands):
    """batched_nms' trick (torchvision, mmcv): NMS boxes shifted by label * (max coordinate + 1),
    in float32. cands: (score, key, label, box) -> (score, key, label, box, shifted box)."""
    if not cands:
        return []
    max_coord = max(max(c[3]) for c in cands)
    shifted = []
    for c in cands:
        offset = F32(c[2]) * (max_coord + F32(1))
        shifted.append((*c[:4], [v + offset for v in c[3]]))
    return shifted


def greedy_nms_reference(cands, iou_thr: float, plus_one: float, max_det: int, as_double=False):
    """cands: list of (score, order_key, label, box[, nms box]); sequential greedy class-aware
    NMS on the nms box (default: the box). The float32 IoU is compared with a C float threshold
    (mmdet/mmcv kernels) or, `as_double`, with a double one (torchvision.ops.nms)."""

    def suppresses(k, cand):
        iou = iou_reference(k[-1], cand[-1], plus_one)
        return float(iou) > iou_thr if as_double else iou > F32(iou_thr)

    kept = []
    for cand in sorted(cands, key=lambda c: (-c[0], c[1])):
        if any(k[2] == cand[2] and suppresses(k, cand) for k in kept):
            continue
        kept.append(cand)
        if len(kept) == max_det:
            break
    return kept


def reference_detect(head, b, image_hw, scale, original_hw, mode, nms_pre, thr, nms_iou, max_det):
    """One image, written from docs/modes.md with loops. Returns (kept, NMS candidate count)."""
    img_h, img_w = (int(v) for v in image_hw)
    sy, sx = F32(scale[0]), F32(scale[1])
    legacy = mode == "mmdet_v1"
    input_h, input_w = (n * STRIDES[0] for n in head[0]["cls_logits"].shape[1:3])
    cands = []
    for lvl, (level, s) in enumerate(zip(head, STRIDES, strict=True)):
        cls = sigmoid(level["cls_logits"][b])
        height, width, num_classes = cls.shape
        cls = cls.reshape(height * width, num_classes)
        ctr = sigmoid(level["centerness"][b]).reshape(height * width)
        reg = level["bbox_reg"][b].reshape(height * width, 4)
        if mode.startswith("mmdet"):  # x*s + s//2
            step_x, step_y, offset = s, s, s // 2
        else:  # torchvision's AnchorGenerator: steps of input // feature size, no offset
            step_x, step_y, offset = input_w // width, input_h // height, 0

        def decode(p, reg=reg, width=width, sx=step_x, sy=step_y, offset=offset):
            x, y = F32((p % width) * sx + offset), F32((p // width) * sy + offset)
            left, top, right, bottom = reg[p]
            return [x - left, y - top, x + right, y + bottom]

        def clip(box, minus):
            max_x, max_y = F32(img_w - minus), F32(img_h - minus)
            return [
                min(max(box[0], F32(0)), max_x),
                min(max(box[1], F32(0)), max_y),
                min(max(box[2], F32(0)), max_x),
                min(max(box[3], F32(0)), max_y),
            ]

        if mode == "mmdet_v1":
            points = list(range(height * width))
            if len(points) > nms_pre:  # top points by max over classes of cls*ctr
                best = [max(cls[p, c] * ctr[p] for c in range(num_classes)) for p in points]
                points = sorted(points, key=lambda p: (-best[p], p))[:nms_pre]
            for p in sorted(points):
                box = clip(decode(p), 1)
                box = [box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy]
                for c in range(num_classes):
                    if cls[p, c] > thr:  # raw cls, before centerness
                        cands.append((cls[p, c] * ctr[p], (lvl, p, c), c, box))
        else:
            pairs = []
            for p in range(height * width):
                for c in range(num_classes):
                    if mode == "torchvision":
                        select = np.sqrt(cls[p, c] * ctr[p])
                    else:
                        select = cls[p, c]
                    if select > thr:
                        pairs.append((select, p, c))
            pairs = sorted(pairs, key=lambda t: (-t[0], t[1], t[2]))[:nms_pre]
            for select, p, c in sorted(pairs, key=lambda t: (t[1], t[2])):
                box = clip(decode(p), 0)
                if mode == "mmdet_v3":
                    if original_hw is None:
                        rx, ry = F32(1) / sx, F32(1) / sy
                    else:
                        rx = F32(original_hw[1]) / F32(img_w)
                        ry = F32(original_hw[0]) / F32(img_h)
                    box = [box[0] * rx, box[1] * ry, box[2] * rx, box[3] * ry]
                    if not (box[2] - box[0] > 0 and box[3] - box[1] > 0):
                        continue
                    score = cls[p, c] * ctr[p]
                else:
                    score = select
                cands.append((score, (lvl, p, c), c, box))
    if mode == "mmdet_v3" or (mode == "torchvision" and len(cands) <= 1000):  # CPU limit
        cands = shift_by_label(cands)
    kept = greedy_nms_reference(
        cands, nms_iou, 1.0 if legacy else 0.0, max_det, as_double=mode == "torchvision"
    )
    if mode == "torchvision":  # rescale after NMS
        if original_hw is None:
            kept = [
                (k[0], k[1], k[2], [k[3][0] / sx, k[3][1] / sy, k[3][2] / sx, k[3][3] / sy])
                for k in kept
            ]
        else:
            fy = F32(original_hw[0]) / F32(img_h)
            fx = F32(original_hw[1]) / F32(img_w)
            kept = [
                (k[0], k[1], k[2], [k[3][0] * fx, k[3][1] * fy, k[3][2] * fx, k[3][3] * fy])
                for k in kept
            ]
    return kept, len(cands)


def random_head(seed: int, batch: int, num_classes: int):
    """Head outputs for a PADDED_HW input with logits from a few values, so scores tie often."""
    rng = np.random.default_rng(seed)
    head = []
    for s in STRIDES:
        h, w = math.ceil(PADDED_HW[0] / s), math.ceil(PADDED_HW[1] / s)
        head.append(
            {
                "cls_logits": rng.choice(
                    F32([-4, -3, -2, -1, 0, 1, 2]), (batch, h, w, num_classes)
                ),
                "bbox_reg": (rng.integers(0, 12, (batch, h, w, 4)) * F32(s / 4)).astype(F32),
                "centerness": rng.choice(F32([-2, -1, 0, 1]), (batch, h, w, 1)),
            }
        )
    return head


MODE_SETTINGS = {
    "mmdet_v1": dict(score_thr=0.05, nms_iou=0.5),
    "mmdet_v3": dict(score_thr=0.05, nms_iou=0.5),
    "torchvision": dict(score_thr=0.2, nms_iou=0.6),
}
