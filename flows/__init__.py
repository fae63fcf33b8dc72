"""Prefect tasks and flows over the maptools library."""

from importlib.metadata import version

from maptools.errors import DependencyError

#: The Prefect releases these flows were written for (their caching, locking and result storage APIs).
if not version("prefect").startswith("3."):
    raise DependencyError(f"prefect {version('prefect')} is installed; maptools' flows are written for Prefect 3.",
                          "pip install 'prefect>=3.9,<4' (the range pyproject.toml declares).")
