"""One exception type for every user-facing problem.

The CLI catches `BenchError` and prints its message as a single line with a non-zero exit,
so every message must name the file or key at fault and what is wrong with it.
"""

from __future__ import annotations

import os


class BenchError(Exception):
    """A problem with the user's input (file, config, data) rather than a bug."""


class ConfigError(BenchError):
    """A config key that does not exist or a value of the wrong type."""


class DatasetError(BenchError):
    """A dataset file that is missing, unreadable or malformed."""


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(path_or_text: object) -> str:
    """`path_or_text` as text that any stream can print, on one line.

    A file name that is not valid UTF-8 reaches Python as a str with surrogate escapes
    (b"bad\\xff.jpg" -> "bad\\udcff.jpg"), which raises UnicodeEncodeError when printed; it
    is shown as `bad\\xff.jpg` instead. Control characters (a newline in a file name, a
    terminal escape) are shown as `\\xNN` so that a message stays one harmless line.
    """
    value = os.fspath(path_or_text) if isinstance(path_or_text, os.PathLike) else path_or_text
    if isinstance(value, bytes):
        text = value.decode("utf-8", "backslashreplace")
    else:
        text = str(value)
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that no file name produced
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.translate(_CONTROL)


def file_message(path: object, what: str) -> str:
    """The one-line form of every dataset message: "<printable path>: what is wrong"."""
    return f"{printable(path)}: {printable(what)}"
