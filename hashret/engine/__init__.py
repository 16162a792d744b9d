"""The engine: one layer above the models and the index that everything which searches shares.

- :func:`build_index` (``build``): encode a dataset with a checkpoint and write an index.
- :class:`Engine` (``core``): an index opened once with the model that built it (and
  optionally a matcher that re-ranks): encode a query (text, image features, a dataset item or
  codes), scan, re-rank, attach payloads; add and remove items; pick up other writers' commits.
- :func:`query_index`: one query, one call (the CLI's ``hashret query``).
- ``inputs``: feature files, dataset items and the payloads stored with indexed items.

``hashret query``, ``hashret serve`` and the Python API all go through :meth:`Engine.search`,
so a query gives the same ids, distances and order wherever it is asked. ``hashret.index``
below keeps storage and the scan kernels only; training code is never imported here."""

from hashret.engine.build import build_index
from hashret.engine.core import Engine, finish, query_index
from hashret.engine.inputs import OTHER, read_array, read_features
from hashret.index import index_info, verify_index

__all__ = ["Engine", "OTHER", "build_index", "finish", "index_info", "query_index", "read_array", "read_features",
           "verify_index"]
