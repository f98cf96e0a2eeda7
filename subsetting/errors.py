"""The one error type of the subset builder: a bad input, reported as one line."""


class SubsetError(ValueError):
    """Bad input to emo-subset (corpus, experts file, keep, profile...)."""
