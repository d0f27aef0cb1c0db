"""natserve's version, in one place: the package, ``--version`` and the wheel read it."""

__version__ = "0.1.0"
