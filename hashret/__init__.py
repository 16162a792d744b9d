"""hashret: cross-modal (image <-> text) hashing search.

Learn binary codes for images and texts in one Hamming space, keep them in a checksummed
LMDB index, and search it with a Numba popcount scan -- from Python, the ``hashret`` command
line or an HTTP service. The front door, loaded on first use:

- ``train(model, dataset, bits, out=RUN_DIR)`` -- train a hash model (GCH, DCMH, the
  baselines, or a matcher with its distilled hash head) and write a checkpoint.
- ``load_checkpoint(RUN_DIR)`` -- the trained model (``model.encode(features, modality)``).
- ``build_index(RUN_DIR, modality, out=IDX_DIR)`` -- encode a dataset side into an index.
- ``open_index(IDX_DIR)`` -- a :class:`HashIndex` (or a :class:`ShardedIndex`); both
  ``search(queries, k)``, ``range_search``, ``add``, ``remove``, ``items``, ``verify``.
- ``Engine.open(IDX_DIR, RUN_DIR)`` -- an index with the model that built it:
  ``search(text=... | image_features=... | item=... | codes=..., k)`` encodes, scans,
  re-ranks and attaches payloads; every search (CLI, service, Ray) goes through it.
- Errors: :class:`HashretError` (bad input, one line naming the fix), its kinds
  :class:`CorruptError`, :class:`NotFoundError`, :class:`ConflictError`.

Sub-packages: ``hashret.data`` (datasets, splits), ``hashret.models`` (models by name),
``hashret.index`` (storage and kernels), ``hashret.engine``, ``hashret.serve``,
``hashret.training``, ``hashret.experiments`` (benchmarks), ``hashret.metrics``.
"""

__version__ = "0.1.0"

from hashret.errors import ConflictError, CorruptError, HashretError, NotFoundError  # noqa: E402

# name -> module: imported on first use, so ``import hashret`` loads neither torch nor Numba
_LAZY = {
    "open_index": "hashret.index",
    "HashIndex": "hashret.index.hash_index",
    "ShardedIndex": "hashret.index.sharded",
    "Engine": "hashret.engine.core",
    "build_index": "hashret.engine.build",
    "train": "hashret.training",
    "load_checkpoint": "hashret.models.checkpoint",
}

__all__ = [*_LAZY, "HashretError", "CorruptError", "NotFoundError", "ConflictError", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hashret' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
