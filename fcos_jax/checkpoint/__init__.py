"""Checkpoints on disk (docs/architecture.md#checkpoints).

  store.py  the orbax layout `<dir>/checkpoints/<step>/`: meta, save, restore for training and
            for inference (verified against the step's checksums, newest intact step), the
            one-line errors

A training run's use of it (resume, `init_from`, saves, setting a step aside) is
`training/trainer.py`'s `TrainCheckpoints`.
"""
