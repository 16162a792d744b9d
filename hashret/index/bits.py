"""The one bit convention: code = sign(output) with sign(0) -> +1; +1 -> bit 1, -1 -> bit 0;
bits packed with ``np.packbits`` (most significant bit first), bits/8 bytes per item."""

from __future__ import annotations

import numpy as np

from hashret.errors import HashretError, check


def sign_codes(x) -> np.ndarray:
    """Real-valued outputs (or +-1 codes, or bool bits) -> int8 codes in {-1, +1}; 0 -> +1.

    np.sign and torch.sign map 0 to 0, a third value that corrupts Hamming distances."""
    arr = np.asarray(x)
    if arr.dtype == np.bool_:
        return np.where(arr, 1, -1).astype(np.int8)
    if arr.dtype.kind == "u":
        raise HashretError("codes are unsigned integers (packed bytes?): pass +-1 or real-valued "
                           "codes, or unpack packed codes with hashret.index.bits.unpack_codes")
    check(arr.dtype.kind in "if", f"codes must be numeric, got {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise HashretError("codes hold NaN/inf values: the model produced non-finite outputs")
    return np.where(arr >= 0, 1, -1).astype(np.int8)


def pack_codes(x) -> np.ndarray:
    """(N, bits) real / +-1 / bool codes -> (N, bits/8) uint8, np.packbits order."""
    s = sign_codes(x)
    check(s.ndim == 2, f"codes must be 2-D (items x bits), got shape {s.shape}")
    check(s.shape[1] % 8 == 0, f"code length {s.shape[1]} is not a multiple of 8 bits")
    return np.packbits(s > 0, axis=1)


def unpack_codes(packed, bits: int | None = None) -> np.ndarray:
    """(N, bits/8) uint8 -> (N, bits) int8 codes in {-1, +1}."""
    p = np.asarray(packed)
    check(p.dtype == np.uint8 and p.ndim == 2, f"packed codes must be a 2-D uint8 array, got "
          f"{p.dtype} {p.shape}")
    bits = p.shape[1] * 8 if bits is None else bits
    check(bits == p.shape[1] * 8, f"{p.shape[1]} bytes per code hold {p.shape[1] * 8} bits, not {bits}")
    return np.where(np.unpackbits(p, axis=1) > 0, 1, -1).astype(np.int8)
