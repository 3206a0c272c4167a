"""Evaluation of a model on a dataset's split: COCO box AP.

evaluator.py  `Evaluator` (built once per training run), `evaluate_checkpoint` and
              `evaluate_results_file` (eval.py): the pipeline, the data-parallel predict step,
              host work overlapping the devices, gathering from every process; COCO results
              JSON, the ground truth and pycocotools' COCOeval
"""
