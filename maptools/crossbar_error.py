"""Moved to :mod:`maptools.crossbar.evaluation`; this path still imports, with a ``DeprecationWarning``."""

from maptools._moved import moved

moved(__name__, "maptools.crossbar.evaluation")
