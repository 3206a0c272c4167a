"""Evaluates an FCOS checkpoint (converted or trained) with COCOeval.

  python eval.py --config configs/fcos_r50_caffe_fpn_gn_1x.py --checkpoint ckpt/fcos_r50 \
      --annotations /data/coco/annotations/instances_val2017.json
  python eval.py --config configs/shapes.py --checkpoint workdirs/shapes --per_class
  python eval.py --config configs/shapes.py --detections results.json --annotations gt.json

All logic lives in `fcos_jax.evaluation.evaluator`; this file only parses flags and starts
(multi-host) JAX.
"""

from absl import app, flags
from ml_collections import config_flags

from fcos_jax.utils import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("checkpoint", None, "A converted directory or a training workdir.")
flags.DEFINE_string("detections", "", "Evaluate this COCO results json instead of a checkpoint.")
flags.DEFINE_string("annotations", "", "instances JSON (default: ground truth from the dataset).")
flags.DEFINE_string("results", "", "Write the COCO results json here.")
flags.DEFINE_bool("per_class", False, "Print AP per category after the 12-line table.")
cli.define_allow_other_config_name()
cli.define_distributed_flags()
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(FLAGS.checkpoint) == bool(FLAGS.detections):
        raise app.UsageError("give exactly one of --checkpoint and --detections")
    config = cli.config_from_flag()
    cli.start_jax(FLAGS, config)
    from fcos_jax.evaluation import evaluator

    if FLAGS.detections:
        evaluator.evaluate_results_file(
            config, FLAGS.detections, FLAGS.annotations or None, per_class=FLAGS.per_class
        )
        return
    evaluator.evaluate_checkpoint(
        config,
        FLAGS.checkpoint,
        annotations=FLAGS.annotations or None,
        results_path=FLAGS.results or None,
        per_class=FLAGS.per_class,
        allow_other_config_name=FLAGS.allow_other_config_name,
    )


if __name__ == "__main__":
    cli.run(main)
