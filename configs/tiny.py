"""The smallest end-to-end config, for tests of train.py / eval.py (CLIs, resume, multi-process).

  python train.py --config configs/tiny.py --workdir /tmp/tiny
  python eval.py --config configs/tiny.py --checkpoint /tmp/tiny

The shapes model on 16 training images of about 100 px, batch 4, a few steps. Not a model to use.
The tests compare runs on other device and process counts parameter by parameter, which fixes
two choices (the runs behind them: docs/benchmarks.md#behind-the-code):
  * frozen BatchNorm (running statistics, as every model-zoo row): with batch statistics the
    cross-device sum order moves the statistics by rounding, and within a few steps a max-pool
    or ReLU near-tie in the stem routes a gradient to another pixel;
  * SGD, not the demo's AdamW: SGD's update is linear in the gradient, so reduction-order rounding
    stays at rounding size; AdamW's g / (sqrt(v) + eps) magnifies it in near-zero-gradient biases.
"""

from pathlib import Path

from fcos_jax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("shapes.py"))
    c.name = "tiny"
    c.data.shapes.num_train, c.data.shapes.num_val = 16, 8
    c.data.shapes.min_side, c.data.shapes.max_side = 96, 128
    c.preprocess.scale = (128, 128)
    c.model.backbone.norm = "frozen_bn"
    c.augment.multiscale = ((128, 128),)
    o = c.optim
    o.optimizer, o.base_lr, o.weight_decay, o.bias_lr_mult = "sgd", 0.02, 1e-4, 2.0
    o.reference_batch, o.lr_steps, o.warmup_iters = 4, (), 2
    t = c.train
    t.batch_size, t.num_steps = 4, 10
    t.log_every, t.checkpoint_every, t.keep_checkpoints = 1, 2, 5
    t.eval_at_end = False
    c.test.batch_size = 4
    return c
