"""Codes on disk and the Hamming scan: ``HashIndex`` (in memory or on LMDB), ``ShardedIndex``
(N of them searched as one, in process or on Ray), the Numba kernels behind them, and the
one bit convention (``pack_codes`` / ``unpack_codes``).

``HashIndex`` is imported on first use, so code that needs only the bit convention (the
metrics, the models) does not load Numba and LMDB."""

from hashret.index.bits import pack_codes, sign_codes, unpack_codes

__all__ = ["HashIndex", "ShardedIndex", "pack_codes", "sign_codes", "unpack_codes"]


def __getattr__(name):
    if name == "HashIndex":
        from hashret.index.hash_index import HashIndex

        return HashIndex
    if name == "ShardedIndex":
        from hashret.index.sharded import ShardedIndex

        return ShardedIndex
    raise AttributeError(f"module 'hashret.index' has no attribute {name!r}")
