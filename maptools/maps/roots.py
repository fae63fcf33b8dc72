"""Where maps live: the output root (a local folder or a store URL) and this machine's folders.

The one reader of maptools' environment variables: ``MAPTOOLS_HOME`` (the default output root),
``MAPTOOLS_CACHE`` (the local mirror of stores, default ``~/.cache/maptools``), and the kill tests'
``MAPTOOLS_TEST_PAUSE_AT`` / ``MAPTOOLS_TEST_PAUSE_DIR`` (:func:`pause_point`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from maptools.errors import SettingsError, StorageError

__all__ = ["MapRef", "is_url", "home", "mirror_root", "output_root", "output_location", "local_root", "pause_point"]


@dataclass(frozen=True)
class MapRef:
    """A map by its name and where ``mapsave/`` is: what every stage takes (in place of ``mapname``, with no
    ``output_root`` beside it) and what a quantization returns (``result.map``), instead of paths to take
    apart. ``root`` is a folder or a store URL; ``None``: ``$MAPTOOLS_HOME``, else the current directory."""

    mapname: str
    root: str | Path | None = None

    def __str__(self) -> str:
        return self.mapname

    @classmethod
    def of(cls, mapname: str | MapRef, root: str | Path | None = None) -> MapRef:
        """``mapname`` (a name, or a reference) with ``root`` as one reference; a root given twice must agree."""
        if not isinstance(mapname, MapRef):
            return cls(mapname, root)
        if root is not None and str(root) != str(mapname.root):
            raise SettingsError(f"map {mapname.mapname!r} is referenced at {mapname.root} but output_root={root} "
                                "was given too.", "pass the MapRef alone, or a map name with output_root.")
        return mapname

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(root: str | Path | None) -> bool:
    """Whether ``root`` names a store (``s3://``, ``memory://``, ...), not a local path (``file://`` is local)."""
    match = _URL.match(root) if isinstance(root, str) else None
    return match is not None and match["scheme"].lower() != "file"


def home(root: str | Path | None = None) -> str | Path | None:
    """``root`` if given, else ``$MAPTOOLS_HOME`` (None where neither is set)."""
    return root or os.environ.get("MAPTOOLS_HOME") or None


def mirror_root(url: str) -> Path:
    """The local folder that holds this machine's copies of the maps of store ``url``."""
    base = Path(os.environ.get("MAPTOOLS_CACHE") or Path.home() / ".cache" / "maptools").expanduser()
    return base / "store" / hashlib.sha256(url.encode()).hexdigest()[:16]


def output_root(root: str | Path | None = None) -> Path:
    """``root`` if given, else ``$MAPTOOLS_HOME``, else the current directory, as a local path.

    A store URL (``s3://...``) is not a path: see :func:`output_location`."""
    value = home(root) or Path.cwd()
    if is_url(value):
        raise StorageError(f"{value} is a store URL, not a local folder.", "pass a local output_root here.")
    if isinstance(value, str) and value.startswith("file://"):
        value = value.removeprefix("file://")
    return Path(value).expanduser().resolve()


def output_location(root: str | Path | None = None) -> Path | str:
    """Where maps go: a local path (:func:`output_root`), or a store URL (``s3://bucket/prefix``) as given."""
    value = home(root)
    return str(value).rstrip("/") if is_url(value) else output_root(value)


def local_root(root: str | Path | None = None) -> Path:
    """The local folder for files that stay on this machine (example models, prepared models): the output
    root itself, or for a store URL this machine's mirror of that store."""
    where = output_location(root)
    return mirror_root(where) if isinstance(where, str) else where


def pause_point(point: str) -> None:
    """Fault injection for the kill tests: with ``MAPTOOLS_TEST_PAUSE_AT=<point>`` set, a write stops
    here (after touching ``<point>.reached`` in ``MAPTOOLS_TEST_PAUSE_DIR``) until it is killed."""
    if os.environ.get("MAPTOOLS_TEST_PAUSE_AT") == point:
        Path(os.environ["MAPTOOLS_TEST_PAUSE_DIR"], f"{point}.reached").touch()
        time.sleep(3600)
