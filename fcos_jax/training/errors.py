"""Errors that stop a training run for a reason the user can act on, other than the ValueError
and OSError every tool reports: `train.py` prints them in one line and exits with status 2.
Standard library only, so `train.py` can name them before JAX starts."""


class NonFiniteStepError(FloatingPointError):
    """A step's loss, or the state its update produced, holds NaN or infinity."""
