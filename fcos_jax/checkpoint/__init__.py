"""Checkpoints on disk (docs/architecture.md#checkpoints).

  store.py      the orbax layout `<dir>/checkpoints/<step>/`: meta, save, restore for training
                and for inference (verified, newest intact step), the one-line errors
  integrity.py  checksums of a step's arrays and JSON, and the names of what does not match

A training run's use of them (resume, `init_from`, saves, setting a step aside) is
`training/checkpoints.py`'s.
"""
