"""The converter's one error type: its message is one line naming the file, key or shape."""


class ConversionError(ValueError):
    """A source file or state dict that cannot be converted for the configured model."""
