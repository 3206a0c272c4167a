"""Images and annotations in, batches out (docs/architecture.md#data-flow). Of the data and model
code, only this folder imports TensorFlow (sources, coco_folder, tfrecord_access, transforms,
pipeline); the test-time preprocessing, the canvases, annotations, shapes and the planning modules
(examples, epoch_plan, eval_plan, geometry) are NumPy and cv2.

  preprocess.py   test-time decode, resize, normalize, pad (predict, evaluation, Detector); the
                  size rules and the normalization training shares
  canvas.py       the fixed (H, W) canvases images are padded into

  annotations.py  COCO instances JSON validation; the annotation index of a split (no pixels)
  coco_folder.py  the TFDS builder that prepares any COCO-format folder (JSON + images)
  shapes.py       the built-in synthetic shapes dataset, written as a COCO-format folder
  sources.py      TFDS `coco/2017`, prepared COCO folders and shapes behind one example dict
  tfrecord_access.py  random access into TFDS splits prepared as tfrecord (coco/2017's default)
  examples.py     the usable examples of a split: boxes cleaned once, at index time (NumPy)
  epoch_plan.py   training canvases, scales and the epoch plan of (seed, epoch) (NumPy)
  eval_plan.py    evaluation batches grouped by padded shape, dummies to fill (NumPy)
  geometry.py     one example at one scale: resized size, factors, boxes placed and padded (NumPy)
  transforms.py   training pixel transforms in TF ops, docs/modes.md §2.7
  pipeline.py     the tf.data pipelines: per-process slices, iterator state, evaluation passes

Import the submodules directly (`from fcos_jax.data import pipeline`); this file imports nothing so
that the TF-free parts (annotations, shapes and the planning modules) stay cheap to import.
"""
