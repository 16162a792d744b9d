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


def as_packed(codes, bits: int, what: str = "codes") -> np.ndarray:
    """Codes handed to an index -> packed (N, bits/8) uint8, refusing anything ambiguous.

    Accepted: packed uint8 (N, bits/8); bool or 0/1 arrays (N, bits) as bits (np.unpackbits
    output, any integer or float dtype); +-1 integer arrays as signs; real-valued outputs as
    signs (0 -> +1). An integer array with other values (a -1/0/1 mix, 2, ...) is refused:
    reading 0/1 bits as signs would store every bit as 1."""
    nbytes = bits // 8
    arr = np.asarray(codes)
    if arr.dtype.kind not in "biuf":
        raise HashretError(f"{what} must be a numeric array, got {arr.dtype}: pass packed uint8 "
                           f"bytes (N, {nbytes}) or (N, {bits}) bits / +-1 signs / real outputs")
    if arr.ndim == 1:
        arr = arr[None, :]
    check(arr.ndim == 2, f"{what} must be 2-D (items x bytes), got shape {arr.shape}")
    width = arr.shape[1]
    if arr.dtype == np.uint8 and width == nbytes:
        return np.ascontiguousarray(arr)
    if width != bits:
        have = (f"{width * 8} bits ({width} packed bytes)" if arr.dtype == np.uint8 and width * 8 != bits
                else f"{width} bits")
        raise HashretError(f"{what} have {have} but the index holds {bits}-bit codes ({nbytes} "
                           f"packed bytes or {bits} bits per item): encode with the model the "
                           "index was built with")
    if arr.dtype == np.bool_:
        return np.packbits(arr, axis=1)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise HashretError(f"{what} hold NaN/inf values: the model produced non-finite outputs")
    if len(arr) == 0:
        return np.zeros((0, nbytes), np.uint8)
    lo, hi = arr.min(), arr.max()
    is_bits = lo >= 0 and hi <= 1 and (arr.dtype.kind in "iu" or np.all((arr == 0) | (arr == 1)))
    if is_bits:
        return np.packbits(arr > 0, axis=1)
    if arr.dtype.kind in "iu":
        check(lo >= -1 and hi <= 1 and not (arr == 0).any(),
              f"integer {what} must be 0/1 bits or +-1 signs, got values in [{lo}, {hi}]"
              + (" with zeros beside -1" if lo == -1 else "") + ": say which, e.g. pass "
              "(codes > 0) for bits")
    return np.packbits(arr >= 0, axis=1)
