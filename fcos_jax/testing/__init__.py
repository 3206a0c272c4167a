"""Seeded inputs for parity checks, shared by the tests and the benchmarks.

`images.natural_image` draws natural-looking synthetic images (NumPy + cv2). The torch
references they are compared with live beside `compare` (`compare/torchvision_random.py`,
`compare/mmdet_reference.py`). Nothing on the training or inference path imports this package.
"""
