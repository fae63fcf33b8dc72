"""Names the original toolchain's pickles use (see :mod:`maptools.maps.seed`); nothing else lives here."""
