"""Trains an FCOS model.

  python train.py --config configs/shapes.py --workdir workdirs/shapes
  python train.py --config configs/fcos_r50_caffe_fpn_gn_1x.py --workdir workdirs/r50 \
      --config.init_from=ckpt/resnet50_caffe --config.data.data_dir=/data/tfds

All logic lives in `fcos_jax.training.trainer`; this file only parses flags and starts
(multi-host) JAX.
A second run on a workdir in use, a non-finite step and every usage or data error print one line
`error: ...` and exit with status 2.
Several processes: pass --coordinator_address, --num_processes and --process_id (or set
FCOS_COORDINATOR, FCOS_NUM_PROCESSES, FCOS_PROCESS_ID).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from fcos_jax.training.errors import NonFiniteStepError
from fcos_jax.utils import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and results go here.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = cli.config_from_flag()
    cli.start_jax(FLAGS, config)
    from fcos_jax.training import trainer  # after jax.distributed is up

    logging.info("config %s, workdir %s", config.name, FLAGS.workdir)
    trainer.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main, errors=(NonFiniteStepError,))
