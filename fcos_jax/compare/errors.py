"""The comparison's error types: one line each, naming the file or field."""


class CompareError(Exception):
    """The comparison cannot run (exit status 2)."""


class ReferenceWeightsError(CompareError):
    """The reference cannot run the checkpoint's tensors (the message lacks the file name)."""
