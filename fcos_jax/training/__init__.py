"""Training (docs/architecture.md#data-flow: from a batch to an update).

  trainer.py        `train_and_evaluate(config, workdir)`: the loop and its cadence of reports,
                    checkpoints and evaluations; the run's checkpoints (resume, `init_from`,
                    saves, setting a step aside); what a run reports on process 0 (TensorBoard
                    scalars, progress bar, log lines)
  train_step.py     the train state and the jitted data-parallel step (gradients per device,
                    reduced once; gradient accumulation)
  optim.py          SGD/AdamW with mmdetection's parameter groups, lr schedule, warm-up, clipping
  workdir_lock.py   one writer per workdir
  errors.py         the errors train.py reports in one line (standard library only)
  communication.py  what the compiled train and predict steps move between devices

This file imports nothing: `train.py` reads `errors` before JAX starts.
"""
