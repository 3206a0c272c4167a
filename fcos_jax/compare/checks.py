"""The tolerances of a comparison and the checks that apply them: head outputs per level, and
detection sets matched one to one."""

import numpy as np

from fcos_jax.compare.errors import CompareError

HEAD_RTOL = 1e-4  # per level: max|ours - ref| <= HEAD_RTOL * max|ref|
BOX_ATOL = 0.01  # pixels
SCORE_ATOL = 1e-4
INPUT_ATOL = 1e-5  # our preprocessing vs the reference transform (reported, and checked)
# A model computing in bfloat16 (8 significand bits: relative rounding 2^-9 per operation, over
# some sixty layers) against a float32 reference: head outputs per level, relative to the level's
# max|ref|, and detection tolerances. Measured on random torchvision weights at 512 px
# (tests/test_torchvision_parity.py): cls_logits 0.067, bbox_reg 0.114, centerness 0.203 (its
# logits are small there, so relative to max|ref| it is the largest). A wrong layout or dtype
# path is off by the order of max|ref| itself.
BFLOAT16_HEAD_RTOL = 0.3
BFLOAT16_BOX_ATOL = 2.0  # pixels
BFLOAT16_SCORE_ATOL = 0.02


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


def match_detections(
    ours: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    box_atol: float = BOX_ATOL,
    score_atol: float = SCORE_ATOL,
    min_score: float | None = None,
) -> list[str]:
    """Problems found matching two detection sets (empty when they agree).

    Each reference detection must pair with one of ours of the same label, boxes within
    `box_atol` px and score within `score_atol` (order may differ where scores nearly tie), and
    the counts must be equal. With `min_score` only reference detections scoring at least that
    need a match and the counts are not compared (a lower-precision run moves detections near
    the score threshold in or out)."""
    if min_score is None and len(ours["scores"]) != len(ref["scores"]):
        return [f"count: ours {len(ours['scores'])} vs reference {len(ref['scores'])}"]
    problems = []
    free = np.ones(len(ours["scores"]), dtype=bool)
    for i in range(len(ref["scores"])):
        if min_score is not None and ref["scores"][i] < min_score:
            continue
        close = (
            free
            & (ours["labels"] == ref["labels"][i])
            & np.all(np.abs(ours["boxes"] - ref["boxes"][i]) <= box_atol, axis=1)
            & (np.abs(ours["scores"] - ref["scores"][i]) <= score_atol)
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
