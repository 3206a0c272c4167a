"""The detection math of FCOS: pure JAX and NumPy functions of arrays, no model, no data.

boxes.py        box algebra (ltrb encode/decode, IoU/GIoU, clip, flip, COCO xywh); the only
                home of the +1 pixel convention
points.py       the point grid of every pyramid level, per mode
targets.py      target assignment and centerness targets (static shapes)
losses.py       focal, IoU/GIoU and centerness losses and their normalizers
postprocess.py  head outputs -> detections: each mode's candidates, decoding, rescale, `detect`
nms.py          exact greedy class-aware NMS in fixed shapes
"""
