"""Class lists: channel -> (dataset category id, name). They travel with every checkpoint.

`coco`: the 80 COCO classes in category-id order (mmdet: channel c <-> cat_ids[c],
docs/modes.md §2.11).
`coco91`: torchvision's id-indexed head with 91 channels: channel = COCO category id, channel 0
is the background and the 10 unused ids are 'N/A'.
`shapes`: the built-in synthetic dataset (rectangle, ellipse, triangle, cross; ids 1..4).
"""

# Index = COCO category id (0 and the unused ids are placeholders).
_COCO_BY_ID = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A",
    "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A",
    "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

ClassList = list[tuple[int, str]]


def coco_classes() -> ClassList:
    """The 80 COCO classes: [(category_id, name)] in channel order."""
    return [(i, n) for i, n in enumerate(_COCO_BY_ID) if i > 0 and n != "N/A"]


def coco91_classes() -> ClassList:
    """torchvision's 91-channel COCO head: channel i is category id i."""
    return list(enumerate(_COCO_BY_ID))


# The built-in synthetic dataset (fcos_jax/data/shapes.py): category ids 1..4 in this order.
SHAPES_NAMES = ("rectangle", "ellipse", "triangle", "cross")


def shapes_classes() -> ClassList:
    """The built-in shapes dataset's classes: [(category_id, name)], ids 1..4."""
    return [(i + 1, n) for i, n in enumerate(SHAPES_NAMES)]


NAMED_CLASS_LISTS = {"coco": coco_classes, "coco91": coco91_classes, "shapes": shapes_classes}


def class_list(name: str) -> ClassList:
    """A named class list (`config.data.classes`)."""
    if name not in NAMED_CLASS_LISTS:
        raise ValueError(f"data.classes: unknown class list {name!r} ({sorted(NAMED_CLASS_LISTS)})")
    return NAMED_CLASS_LISTS[name]()


def from_meta(meta: dict, where: str) -> ClassList:
    """The class list a checkpoint's `meta` carries ([[category_id, name], ...], channel order)."""
    raw = meta.get("classes")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: the checkpoint's meta holds no class list")
    try:
        return [(int(cid), str(name)) for cid, name in raw]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: malformed class list in the checkpoint's meta") from None


def resolve_num_classes(config, classes: ClassList, where: str):
    """`config` with `model.head.num_classes` fitting `classes` (a copy; the input is unchanged).

    `model.head.num_classes = 0` means "as many as the data has": it becomes len(classes).
    A fixed head must match: otherwise ValueError naming `where` (the classes' origin, e.g.
    the dataset or checkpoint) and both numbers.
    """
    num_classes = int(config.model.head.num_classes)
    if num_classes == 0:
        resolved = config.copy_and_resolve_references()
        resolved.model.head.num_classes = len(classes)
        return resolved
    if num_classes != len(classes):
        raise ValueError(
            f"{where} has {len(classes)} classes, but model.head.num_classes is {num_classes} "
            f"(data.classes={config.data.classes!r}; model.head.num_classes=0 takes the number "
            "from the data)"
        )
    return config
