"""Seeded inputs for parity checks, shared by the tests and the benchmarks.

`images.natural_image` draws natural-looking synthetic images (NumPy + cv2);
`torchvision_random` builds torchvision's FCOS with seeded random weights in which nothing is
an identity. Nothing on the training or inference path imports this package; the second module
needs torch and torchvision (the `convert` or `dev` extra). docs/architecture.md#imports.
"""
