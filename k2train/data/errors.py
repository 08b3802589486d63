"""The one error type of the data path."""


class DataError(ValueError):
    """A data file, tokenizer or sampler setting that cannot be used; the message names the file."""
