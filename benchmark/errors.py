"""One exception type for every user-facing problem.

The CLI catches `BenchError` and prints its message as a single line with a non-zero exit,
so every message must name the file or key at fault and what is wrong with it.
"""


class BenchError(Exception):
    """A problem with the user's input (file, config, data) rather than a bug."""


class ConfigError(BenchError):
    """A config key that does not exist or a value of the wrong type."""


class DatasetError(BenchError):
    """A dataset file that is missing, unreadable or malformed."""
