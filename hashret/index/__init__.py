"""Codes on disk and the Hamming scan: ``HashIndex`` (in memory or on LMDB), the Numba
kernels behind it, and the one bit convention (``pack_codes`` / ``unpack_codes``)."""

from hashret.index.bits import pack_codes, sign_codes, unpack_codes
from hashret.index.hash_index import HashIndex

__all__ = ["HashIndex", "pack_codes", "sign_codes", "unpack_codes"]
