"""Artifacts: URI I/O, local copies of remote directories, stage outputs with their manifests and keys, the
Parquet contracts, the run lock, retention and failpoints. The lowest layer: it imports nothing else of arborl."""
