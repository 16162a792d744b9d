"""Codes on disk and the Hamming scan: ``HashIndex`` (in memory or on LMDB), the Numba
kernels behind it, and the one bit convention (``pack_codes`` / ``unpack_codes``).

``HashIndex`` is imported on first use, so code that needs only the bit convention (the
metrics, the models) does not load Numba and LMDB."""

from hashret.index.bits import pack_codes, sign_codes, unpack_codes

__all__ = ["HashIndex", "pack_codes", "sign_codes", "unpack_codes"]


def __getattr__(name):
    if name == "HashIndex":
        from hashret.index.hash_index import HashIndex

        return HashIndex
    raise AttributeError(f"module 'hashret.index' has no attribute {name!r}")
