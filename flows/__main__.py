"""``python -m flows`` is the ``maptools`` command."""

from flows.cli import app

app()
