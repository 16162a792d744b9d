"""hashret: cross-modal (image <-> text) hashing search.

Sub-packages: ``hashret.data`` (datasets, splits, featurizers), ``hashret.models``
(hash models built by name), ``hashret.metrics`` (mAP and friends), ``hashret.experiments`` (the benchmark).
"""

__version__ = "0.1.0"

from hashret.errors import CorruptError, HashretError  # noqa: E402

__all__ = ["CorruptError", "HashretError", "__version__"]
