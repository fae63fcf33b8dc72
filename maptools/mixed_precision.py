"""Moved to :mod:`maptools.quantization.mixed_precision`; this path still imports, with a ``DeprecationWarning``."""

from maptools._moved import moved

moved(__name__, "maptools.quantization.mixed_precision")
