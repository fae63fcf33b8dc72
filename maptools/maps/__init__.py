"""The map folder ``<output_root>/<mapname>/``: where every stage reads and writes its artifacts.

- :mod:`~maptools.maps.roots`: the output root (``MAPTOOLS_HOME``) and the cache folder;
- :mod:`~maptools.maps.folder`: a local map folder, its versions and atomic, locked commits;
- :mod:`~maptools.maps.store`: the same on S3 or any fsspec store (``s3://bucket/prefix``);
- :mod:`~maptools.maps.manifest`: the manifest's typed schema;
- :mod:`~maptools.maps.artifacts`: file names, atomic writes, safe pickles, the typed readers;
- :mod:`~maptools.maps.seed`: the original toolchain's pickle contract (``profile='seed'``).
"""
