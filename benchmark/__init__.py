"""bench: a self-supervised representation benchmark (Context Encoders, PASCAL VOC transfer).

`__version__` is the one place the version is written: pyproject.toml reads it at build time
(`[tool.setuptools.dynamic]`), `bench --version` and `bench env` at run time.
"""

__version__ = "0.1.0"
