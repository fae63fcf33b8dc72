"""Names the original toolchain's pickles use (see :mod:`maptools.seed`); nothing else lives here."""
