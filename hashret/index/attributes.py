"""Per-row attributes kept with the codes, and the filters that select rows by them.

An index may carry *columns*, fixed when its first rows are added: a **label set** (named
labels, a row holding any number of them, stored as one bit per label), and **scalars** --
``int`` (int64), ``float`` (float64), ``time`` (int64 microseconds since 1970-01-01 UTC) and
``category`` (strings kept as int32 numbers into a dictionary that grows as new values come).
Every row has a value in every column; each column is stored in chunks beside the code
chunks, in the same transactions, sealed like them (see :mod:`hashret.index.store`).

A *filter* is either a boolean numpy array over the index's rows (row order, ``n_rows``
long), or an expression, one JSON-able form for the Python API, the CLI, the service and the
sharded index::

    {"labels": {"any": ["sky", "sea"]}}          # also "all", "none"
    {"year": {"gte": 2000, "lt": 2010}}          # gt gte lt lte eq ne, in, not_in
    {"genre": {"in": ["rock", "pop"]}}           # eq ne in not_in
    {"taken": {"gte": "2024-01-01T00:00:00"}}    # time: ISO 8601 (UTC) or seconds
    {"id": {"not_in": [3, 17]}}                  # the items' ids
    {"and": [F, ...]}, {"or": [F, ...]}, {"not": F}

Several keys in one object must all hold. :func:`parse_filter` checks an expression against
the index's columns before anything is scanned; :func:`evaluate` turns it into a boolean
array over the rows (numpy over each column's chunks, in place) or tests it on given rows;
:mod:`hashret.index.postings` finds a selective filter's rows without a pass over every row.
"""

from __future__ import annotations

import datetime as _dt
import json

import numpy as np

from hashret.errors import HashretError, check, is_integer

KINDS = ("labels", "int", "float", "time", "category")
MAX_LABELS = 4096
_STORED = {"int": "<i8", "float": "<f8", "time": "<i8", "category": "<i4"}
_RANGE = ("gt", "gte", "lt", "lte", "eq", "ne")
_SETS = ("in", "not_in")
_LABEL_OPS = ("any", "all", "none")
_EPOCH = np.datetime64(0, "us")


class Labels:
    """A label-set column given as a multi-hot array: ``multi_hot`` (rows, len(names)),
    nonzero where a row holds the label, and the labels' ``names`` (the fast form for
    many rows; a list of lists of names works too)."""

    def __init__(self, multi_hot, names):
        self.multi_hot = np.asarray(multi_hot)
        self.names = [str(n) for n in names]
        check(self.multi_hot.ndim == 2 and self.multi_hot.shape[1] == len(self.names),
              f"Labels: multi_hot has shape {self.multi_hot.shape}, names {len(self.names)} labels")

    def __len__(self):
        return len(self.multi_hot)


def row_bytes(col: dict) -> int:
    """Bytes a row takes in column ``col``."""
    return (len(col["names"]) + 7) // 8 if col["kind"] == "labels" else np.dtype(_STORED[col["kind"]]).itemsize


def view(col: dict, raw: np.ndarray) -> np.ndarray:
    """A stored chunk's bytes (uint8) as the column's values: (rows, bytes) uint8 for labels,
    else a 1-D array of its type."""
    if col["kind"] == "labels":
        return raw.reshape(-1, row_bytes(col))
    return raw.view(_STORED[col["kind"]])


def check_schema(schema) -> str | None:
    """What is wrong with a stored schema (None: nothing)."""
    if not isinstance(schema, list):
        return "is not a list"
    seen = set()
    for col in schema:
        if not (isinstance(col, dict) and isinstance(col.get("name"), str) and col.get("kind") in KINDS):
            return f"holds {col!r}, not a column record"
        if col["name"] in seen or col["name"] in ("id", "and", "or", "not"):
            return f"names column {col['name']!r} twice or reserved"
        seen.add(col["name"])
        key = {"labels": "names", "category": "categories"}.get(col["kind"])
        if key and not (isinstance(col.get(key), list) and all(isinstance(v, str) for v in col[key])):
            return f"column {col['name']!r} lacks its {key}"
    return None


# -- values in, bytes out --------------------------------------------------------------------


def _name_ok(name) -> bool:
    return isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum() and \
        name not in ("id", "and", "or", "not")


def _kind_of(name, values) -> str:
    if isinstance(values, Labels):
        return "labels"
    arr = np.asarray(values) if not isinstance(values, (list, tuple)) or not values or \
        not isinstance(values[0], (list, tuple, set, frozenset)) else None
    if arr is None:
        return "labels"
    if arr.dtype.kind == "M":
        return "time"
    if arr.dtype.kind in "iu":
        return "int"
    if arr.dtype.kind == "f":
        return "float"
    if arr.dtype.kind in "UO" and all(isinstance(v, str) for v in arr.ravel().tolist()):
        return "category"
    raise HashretError(f"attribute {name!r}: cannot tell its kind from values like "
                       f"{arr.ravel()[:3].tolist()!r}: give integers, floats, numpy datetime64, "
                       "strings, or label lists")


def new_schema(attributes: dict) -> list:
    """The columns the first add's ``attributes`` define (kinds from the values)."""
    check(isinstance(attributes, dict) and attributes, "`attributes` must be a dict of column name -> values")
    schema = []
    for name, values in attributes.items():
        check(_name_ok(name), f"attribute name {name!r}: use letters, digits, '_' or '-' "
              "(not 'id', 'and', 'or', 'not')")
        kind = _kind_of(name, values)
        col = {"name": name, "kind": kind}
        if kind == "labels":
            col["names"] = list(values.names) if isinstance(values, Labels) else \
                sorted({str(v) for row in values for v in row})
            check(len(col["names"]) <= MAX_LABELS, f"attribute {name!r}: {len(col['names'])} labels, "
                  f"at most {MAX_LABELS}")
            check(len(set(col["names"])) == len(col["names"]), f"attribute {name!r}: a label is named twice")
        if kind == "category":
            col["categories"] = []
        schema.append(col)
    return schema


def encode(schema: list, attributes, n: int):
    """(columns, schema): each column's rows as (n, row_bytes) uint8, and the schema with
    any new categories added (the stored one is replaced in the same transaction)."""
    if not schema:
        check(attributes is None, "`attributes` given to an index without attribute columns: its "
              "columns are set by its first add")
        return None, schema
    names = [c["name"] for c in schema]
    # a label set left out is empty (an item without labels); every scalar needs a value
    given = dict(attributes) if isinstance(attributes, dict) else {}
    for c in schema:
        if c["kind"] == "labels" and c["name"] not in given and (attributes is None or isinstance(attributes, dict)):
            given[c["name"]] = Labels(np.zeros((n, len(c["names"])), bool), c["names"])
    check(set(given) == set(names),
          f"this index stores attributes {', '.join(names)}: pass `attributes` with these columns "
          f"(a label set may be left out) (got {', '.join(map(str, given)) or None})")
    attributes = given
    out, schema = [], [dict(c) for c in schema]
    for col in schema:
        values = attributes[col["name"]]
        check(len(values) == n, f"attribute {col['name']!r} has {len(values)} values for {n} codes")
        out.append(_encode_column(col, values, n).reshape(n, row_bytes(col)))
    return out, schema


def _encode_column(col, values, n):
    name, kind = col["name"], col["kind"]
    if kind == "labels":
        if isinstance(values, Labels):
            pos = {v: i for i, v in enumerate(values.names)}
            known = set(col["names"])
            unknown = [v for v in values.names if v not in known]
            if unknown:
                raise HashretError(f"attribute {name!r}: unknown label {unknown[0]!r}; its labels are "
                                   "fixed by the first add")
            hot = np.zeros((n, len(col["names"])), dtype=bool)
            for j, label in enumerate(col["names"]):
                if label in pos:
                    hot[:, j] = values.multi_hot[:, pos[label]] != 0
        else:
            where = {v: j for j, v in enumerate(col["names"])}
            hot = np.zeros((n, len(col["names"])), dtype=bool)
            for i, row in enumerate(values):
                check(isinstance(row, (list, tuple, set, frozenset)),
                      f"attribute {name!r}: row {i} is {row!r}, not a list of labels")
                for v in row:
                    j = where.get(str(v))
                    check(j is not None, f"attribute {name!r}: unknown label {v!r}; its labels are "
                          f"fixed by the first add ({', '.join(col['names'][:8])}...)")
                    hot[i, j] = True
        return np.packbits(hot, axis=1).reshape(-1)
    if kind == "category":
        vals = np.asarray(values, dtype=object).ravel()
        check(all(isinstance(v, str) for v in vals.tolist()), f"attribute {name!r} holds categories: give strings")
        known = {v: i for i, v in enumerate(col["categories"])}
        for v in dict.fromkeys(vals.tolist()):
            if v not in known:
                known[v] = len(col["categories"])
                col["categories"].append(v)
        return np.array([known[v] for v in vals.tolist()], dtype="<i4").view(np.uint8)
    if kind == "time":
        arr = _times(values, name)
        return arr.astype("<i8").view(np.uint8)
    arr = np.asarray(values)
    if kind == "int":
        check(arr.dtype.kind in "iu" and arr.ndim == 1, f"attribute {name!r} holds integers: give a 1-D integer array")
        return arr.astype("<i8").view(np.uint8)
    check(arr.dtype.kind in "iuf" and arr.ndim == 1, f"attribute {name!r} holds numbers: give a 1-D numeric array")
    arr = arr.astype("<f8")
    check(not np.isnan(arr).any(), f"attribute {name!r} holds NaN: give a number for every item")
    return arr.view(np.uint8)


def _times(values, name) -> np.ndarray:
    """Microseconds since 1970 (UTC) of datetime64 values, ISO strings or seconds."""
    arr = np.asarray(values)
    try:
        if arr.dtype.kind == "M":
            return (arr.astype("datetime64[us]") - _EPOCH).astype(np.int64)
        if arr.dtype.kind in "iuf":
            return np.round(arr.astype(np.float64) * 1e6).astype(np.int64)
        return (np.array([_dt.datetime.fromisoformat(str(v)).replace(tzinfo=None) for v in arr.ravel()],
                         dtype="datetime64[us]") - _EPOCH).astype(np.int64)
    except (ValueError, TypeError):
        raise HashretError(f"attribute {name!r} holds times: give datetime64, ISO 8601 strings "
                           "(2024-01-31T12:00:00) or seconds since 1970") from None


# -- filters -----------------------------------------------------------------------------------


def parse_filter(expr, schema: list, n_rows: int):
    """A checked filter: a boolean row array, or the expression as a tree of tuples. One line
    naming the problem otherwise; nothing is scanned."""
    if isinstance(expr, np.ndarray):
        check(expr.dtype == bool and expr.shape == (n_rows,),
              f"a filter array must be boolean with one entry per row ({n_rows}), got {expr.dtype} "
              f"{expr.shape}")
        return ("mask", expr)
    columns = {c["name"]: c for c in schema}
    return _parse(expr, columns, "filter")


MAX_DEPTH = 32  # nesting of and/or/not: a filter is a caller's input, its depth bounded


def _parse(expr, columns, where, depth=0):
    check(depth <= MAX_DEPTH, f"the filter nests deeper than {MAX_DEPTH} levels")
    check(isinstance(expr, dict) and expr, f"{where} must be a non-empty JSON object, got {str(expr)[:60]}")
    parts = []
    for key, cond in expr.items():
        at = f"{where}.{key}"
        if key in ("and", "or"):
            check(isinstance(cond, list) and cond, f"{at} must be a non-empty list of filters")
            parts.append((key, [_parse(c, columns, f"{at}[{i}]", depth + 1) for i, c in enumerate(cond)]))
        elif key == "not":
            parts.append(("not", _parse(cond, columns, at, depth + 1)))
        elif key == "id":
            check(isinstance(cond, dict) and len(cond) == 1 and next(iter(cond)) in _SETS,
                  f"{at} must be {{\"in\": [ids]}} or {{\"not_in\": [ids]}}")
            op, ids = next(iter(cond.items()))
            check(isinstance(ids, list) and all(is_integer(i) for i in ids), f"{at}.{op} must be a list of integer ids")
            parts.append(("id", op, np.asarray(ids, dtype=np.int64)))
        elif key in columns:
            parts.append(_condition(columns[key], cond, at))
        else:
            known = ", ".join(["id", *columns]) or "id (this index stores no attributes)"
            raise HashretError(f"{at}: no attribute {key!r}; this index has {known}")
    return parts[0] if len(parts) == 1 else ("and", parts)


def _condition(col, cond, at):
    kind = col["kind"]
    ops = _LABEL_OPS if kind == "labels" else _SETS + (("eq", "ne") if kind == "category" else _RANGE)
    check(isinstance(cond, dict) and cond and set(cond) <= set(ops),
          f"{at} must be an object of {', '.join(ops)} (a {kind} attribute), got {str(cond)[:60]}")
    out = []
    for op, value in cond.items():
        many = op in _SETS or kind == "labels"
        vals = value if many else [value]
        check(isinstance(vals, list) and (vals or not many), f"{at}.{op} must be a list")
        if kind == "labels":
            names = {n: j for j, n in enumerate(col["names"])}
            bad = [v for v in vals if v not in names]
            if bad:
                raise HashretError(f"{at}.{op}: unknown label {str(bad[0])[:40]!r}; the labels are "
                                   f"{', '.join(col['names'][:12])}{', ...' if len(col['names']) > 12 else ''}")
            out.append(("labels", col["name"], op, [names[v] for v in vals]))
        elif kind == "category":
            check(all(isinstance(v, str) for v in vals), f"{at}.{op} must name categories (strings)")
            cats = {c: i for i, c in enumerate(col["categories"])}
            out.append(("category", col["name"], op, [cats[v] for v in vals if v in cats]))
        else:
            out.append(("scalar", col["name"], op, [_scalar(col, v, f"{at}.{op}") for v in vals]))
    return out[0] if len(out) == 1 else ("and", out)


def _scalar(col, v, at):
    if col["kind"] == "time":
        if isinstance(v, str):
            try:
                t = _dt.datetime.fromisoformat(v).replace(tzinfo=None)
            except ValueError:
                raise HashretError(f"{at}: {v!r:.40} is not an ISO 8601 time (2024-01-31T12:00:00)") from None
            return int((np.datetime64(t, "us") - _EPOCH).astype(np.int64))
        check(isinstance(v, (int, float)) and not isinstance(v, bool), f"{at}: give a time as ISO 8601 or seconds")
        return int(round(v * 1e6))
    if col["kind"] == "int":
        check(is_integer(v) or (isinstance(v, float) and np.isfinite(v)),
              f"{at}: {v!r:.40} is not a number (attribute {col['name']!r} holds integers)")
        return v
    check(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v),
          f"{at}: {v!r:.40} is not a finite number (attribute {col['name']!r} holds numbers)")
    return float(v)


def key(expr) -> str | None:
    """A filter expression's canonical text (for caches); None for a row array."""
    return None if isinstance(expr, np.ndarray) else json.dumps(expr, sort_keys=True, separators=(",", ":"))


def evaluate(tree, columns, n_rows: int, rows_of_ids, rows=None) -> np.ndarray:
    """A parsed filter (``parse_filter``) as a boolean array over the rows -- or, given
    ``rows``, over those rows only (what a search that ranks first and filters its
    candidates needs). ``columns``: the index's :class:`~hashret.index.rows.Columns`;
    ``rows_of_ids(ids)``: rows, -1 for an unknown id."""
    op = tree[0]
    if op == "mask":
        return tree[1] if rows is None else tree[1][rows]
    if op in ("and", "or"):
        out = evaluate(tree[1][0], columns, n_rows, rows_of_ids, rows).copy()
        for sub in tree[1][1:]:
            if op == "and":
                out &= evaluate(sub, columns, n_rows, rows_of_ids, rows)
            else:
                out |= evaluate(sub, columns, n_rows, rows_of_ids, rows)
        return out
    if op == "not":
        return ~evaluate(tree[1], columns, n_rows, rows_of_ids, rows)
    if op == "id":
        found = rows_of_ids(tree[2]) if len(tree[2]) else np.zeros(0, np.int64)
        found = found[found >= 0]
        if rows is None:
            out = np.zeros(n_rows, dtype=bool)
            out[found] = True
        else:
            out = np.isin(rows, found)
        return ~out if tree[1] == "not_in" else out
    kind, name, cop, vals = tree
    if rows is not None:
        col, values = columns.values_at(name, rows)
        return _test(kind, cop, vals, values, col)
    col, parts = columns.chunks(name)
    out = np.empty(n_rows, dtype=bool)
    for lo, values in parts:
        out[lo:lo + len(values)] = _test(kind, cop, vals, values, col)
    return out


_BOUNDS = {"gt": (True, None), "gte": (False, None), "lt": (None, True), "lte": (None, False)}


def label_bytes(tree, columns):
    """A labels condition as (column, the bytes of a row it reads, the bits it asks of each):
    a row holds label j at bit ``0x80 >> j % 8`` of byte ``j // 8`` (np.packbits order)."""
    col, _ = columns.chunks(tree[1])
    want = np.zeros(row_bytes(col), dtype=np.uint8)
    for j in tree[3]:
        want[j // 8] |= np.uint8(0x80 >> (j % 8))
    at = np.flatnonzero(want).astype(np.int64)
    return col, at, want[at]


def interval(tree, columns):
    """A condition on one scalar or category column -- a comparison, ``eq``/``ne``, or the
    ``and`` of a lower and an upper bound (``{"gte": a, "lt": b}``) -- as (column, lo, hi,
    lo_open, hi_open, inside) in the column's type; None for any other form."""
    leaves = tree[1] if tree[0] == "and" else [tree]
    if not 1 <= len(leaves) <= 2 or any(t[0] not in ("scalar", "category") for t in leaves) \
            or len({t[1] for t in leaves}) != 1:
        return None
    col, _ = columns.chunks(leaves[0][1])
    dtype = np.dtype(_STORED[col["kind"]])
    info = np.iinfo(dtype) if dtype.kind == "i" else np.finfo(dtype)
    lo, hi, lo_open, hi_open, inside = info.min, info.max, False, False, True
    for _, _, op, vals in leaves:
        if op in _SETS or (op in ("eq", "ne") and len(leaves) > 1):
            return None
        v = vals[0] if vals else None
        if v is None or (dtype.kind == "i" and not (is_integer(v) and info.min <= v <= info.max)):
            return None  # e.g. an int column against 2.5: numpy compares those
        if op in ("eq", "ne"):
            lo = hi = v
            inside = op == "eq"
            continue
        low, high = _BOUNDS[op]
        if low is not None:
            if lo != info.min or lo_open:
                return None  # two lower bounds: left to numpy
            lo, lo_open = v, low
        else:
            if hi != info.max or hi_open:
                return None
            hi, hi_open = v, high
    return col, dtype.type(lo), dtype.type(hi), lo_open, hi_open, inside


def _test(kind, op, vals, values, col):
    """One condition over one chunk's values."""
    if kind == "labels":
        want = np.zeros(values.shape[1], dtype=np.uint8)
        for j in vals:
            want[j // 8] |= np.uint8(0x80 >> (j % 8))  # np.packbits order
        out = np.full(len(values), op == "all") if op == "all" else np.zeros(len(values), bool)
        for b in np.flatnonzero(want).tolist():  # a byte of labels at a time: one pass each
            if op == "all":
                out &= (values[:, b] & want[b]) == want[b]
            else:
                out |= (values[:, b] & want[b]) != 0
        return ~out if op == "none" else out
    if op in _SETS or (kind == "category" and op in ("eq", "ne")):
        inside = np.isin(values, np.asarray(vals, dtype=values.dtype)) if vals else np.zeros(len(values), bool)
        return ~inside if op in ("not_in", "ne") else inside
    v = vals[0]
    return {"gt": np.greater, "gte": np.greater_equal, "lt": np.less, "lte": np.less_equal,
            "eq": np.equal, "ne": np.not_equal}[op](values, v)


def value_of(col: dict, stored):
    """A stored value as JSON: label names, a category's string, an ISO time, a number."""
    if col["kind"] == "labels":
        bits = np.unpackbits(np.asarray(stored, dtype=np.uint8))[:len(col["names"])]
        return [col["names"][j] for j in np.flatnonzero(bits)]
    if col["kind"] == "category":
        return col["categories"][int(stored)]
    if col["kind"] == "time":
        return str(_EPOCH + np.timedelta64(int(stored), "us"))
    return stored.item() if hasattr(stored, "item") else stored


# -- a batch's attributes as JSON (the sharded index's journal) -----------------------------------


def to_json(attributes: dict | None, n: int) -> dict | None:
    """``attributes`` in a JSON form that keeps each column's kind (times as microseconds,
    label sets as indices into their names), checked for length; None stays None."""
    if attributes is None:
        return None
    check(isinstance(attributes, dict) and attributes, "`attributes` must be a dict of column name -> values")
    out = {}
    for name, values in attributes.items():
        check(len(values) == n, f"attribute {name!r} has {len(values)} values for {n} codes")
        kind = _kind_of(name, values)
        if kind == "labels":
            if isinstance(values, Labels):
                names, rows = values.names, [np.flatnonzero(r).tolist() for r in values.multi_hot]
            else:
                names = sorted({str(v) for row in values for v in row})
                at = {v: j for j, v in enumerate(names)}
                rows = [[at[str(v)] for v in row] for row in values]
            out[name] = {"kind": kind, "names": names, "rows": rows}
        elif kind == "time":
            out[name] = {"kind": kind, "values": _times(values, name).tolist()}
        elif kind == "category":
            out[name] = {"kind": kind, "values": [str(v) for v in np.asarray(values, dtype=object).ravel()]}
        else:
            out[name] = {"kind": kind, "values": np.asarray(values).tolist()}
    return out


def from_json(columns: dict | None, rows=None) -> dict | None:
    """:func:`to_json`'s form back as values ``add`` takes, for ``rows`` of it (all: None)."""
    if columns is None:
        return None
    out = {}
    for name, col in columns.items():
        kind = col["kind"]
        if kind == "labels":
            picked = col["rows"] if rows is None else [col["rows"][i] for i in rows]
            hot = np.zeros((len(picked), len(col["names"])), dtype=bool)
            for i, js in enumerate(picked):
                hot[i, js] = True
            out[name] = Labels(hot, col["names"])
            continue
        vals = col["values"] if rows is None else [col["values"][i] for i in rows]
        if kind == "time":
            out[name] = np.array(vals, dtype=np.int64).astype("datetime64[us]")
        elif kind == "int":
            out[name] = np.array(vals, dtype=np.int64)
        elif kind == "float":
            out[name] = np.array(vals, dtype=np.float64)
        else:
            out[name] = list(vals)
    return out


def localise(expr, shard: int, shards: int):
    """A filter expression as shard ``shard`` of ``shards`` sees it, where an item's id is
    its global row (rows mode): each id list keeps the ids that shard holds, as its rows."""
    if isinstance(expr, list):
        return [localise(e, shard, shards) for e in expr]
    if not isinstance(expr, dict):
        return expr
    out = {}
    for k, v in expr.items():
        if k == "id" and isinstance(v, dict):
            out[k] = {op: [int(i) // shards for i in ids if is_integer(i) and i >= 0 and i % shards == shard]
                      if isinstance(ids, list) else ids for op, ids in v.items()}
        else:
            out[k] = localise(v, shard, shards)
    return out

