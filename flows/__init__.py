"""Prefect tasks and flows over the maptools library."""
