"""``python -m maptools_flows`` is the ``maptools`` command."""

from maptools_flows.cli import app

app()
