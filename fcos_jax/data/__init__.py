"""Input pipelines (docs/architecture.md#data-flow). TensorFlow is imported here and nowhere else.

  annotations.py  COCO instances JSON validation; the annotation index of a split (no pixels)
  coco_folder.py  the TFDS builder that prepares any COCO-format folder (JSON + images)
  shapes.py       the built-in synthetic shapes dataset, written as a COCO-format folder
  sources.py      TFDS `coco/2017`, prepared COCO folders and shapes behind one example dict
  tfrecord_access.py  random access into TFDS splits prepared as tfrecord (coco/2017's default)
  transforms.py   training transforms, docs/modes.md §2.7 (boxes in NumPy via boxes.py, pixels
                  in TF ops)
  pipeline.py     epoch plan, canvases, per-process slices, iterator state; evaluation batches

Import the submodules directly (`from fcos_jax.data import pipeline`); this file imports nothing so
that the TF-free parts (annotations, shapes) stay cheap to import.
"""
