"""Moved to :mod:`maptools.maps.folder`; this path still imports, with a ``DeprecationWarning``."""

from maptools._moved import moved

moved(__name__, "maptools.maps.folder")
