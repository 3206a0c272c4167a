"""The tolerances of a comparison and the checks that apply them: head outputs per level, and
detection sets matched one to one."""

import numpy as np

from fcos_jax.compare.errors import CompareError

HEAD_RTOL = 1e-4  # per level: max|ours - ref| <= HEAD_RTOL * max|ref|
BOX_ATOL = 0.01  # pixels
SCORE_ATOL = 1e-4
INPUT_ATOL = 1e-5  # our preprocessing vs the reference transform (reported, and checked)


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
