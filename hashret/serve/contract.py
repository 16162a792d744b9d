"""The service's contract: every request body typed (pydantic), every reply described, and
the checks that come before any work -- body size, JSON depth, NaN, one query kind, the
reply-size budget. The models are what ``/openapi.json`` publishes, so the contract the
server checks and the one it documents are one."""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hashret.errors import HashretError

MAX_DEPTH = 32  # nesting of a request's JSON (payloads included)
MAX_TEXT = 10_000  # characters of one text query or item
MAX_NAME = 200  # characters of an index name or an item key

Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Id = Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SearchRequest(_Strict):
    """``POST /search``: exactly one of ``text``, ``image_features``, ``item``, ``codes``."""

    text: Text | Annotated[list[Text], Field(min_length=1)] | None = Field(
        None, description="Free text (tags), for an index of image codes; one query, or a list.")
    image_features: (Annotated[list[Annotated[list[Finite], Field(min_length=1)]], Field(min_length=1)]
                     | Annotated[list[list[Annotated[list[Finite], Field(min_length=1)]]], Field(min_length=1)]
                     | None) = Field(None, description="Rows of image features (region sets for a matcher), "
                                                         "for an index of text codes. Never a path: the server reads no files.")
    item: Annotated[int, Field(strict=True)] | Name | None = Field(
        None, description="A row number or key of the index's dataset, seen through the other modality.")
    codes: Annotated[list[Annotated[str, Field(min_length=1, max_length=16_384)]], Field(min_length=1)] | None = Field(
        None, description="Codes as hex of their packed bytes (bits/8 bytes each); no model needed.")
    k: Annotated[int, Field(strict=True)] = Field(10, description="Results per query.")
    candidates: Annotated[int, Field(strict=True)] | None = Field(
        None, description="Hamming candidates the matcher re-ranks (default 10 x k); with rerank.")
    rerank: bool = Field(False, description="Re-rank with the server's matcher (--rerank).")
    index: Name | None = Field(None, description="The index to search (a folder name); by default the one "
                                                 "that answers this kind of query.")
    filter: dict[str, Any] | None = Field(
        None, description='Only items that match: an expression over the index\'s attributes, e.g. '
                          '{"labels": {"any": ["sky"]}, "year": {"gte": 2000}} (labels any/all/none; '
                          'gt gte lt lte eq ne in not_in; "id": {"in"|"not_in": [...]}; and/or/not).',
        json_schema_extra={"example": {"labels": {"any": ["sky"]}}})

    @model_validator(mode="after")
    def _one_query(self):
        given = [f for f in ("text", "image_features", "item", "codes") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one query: text, image_features, item or codes"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    def n_queries(self, one_image_per_set: bool = False) -> int:
        """Queries in this request (a matcher's 2-D region set is one image)."""
        if self.codes is not None:
            return len(self.codes)
        if self.image_features is not None:
            sets = isinstance(self.image_features[0][0], list)
            return len(self.image_features) if sets or not one_image_per_set else 1
        return len(self.text) if isinstance(self.text, list) else 1


class AddRequest(_Strict):
    """``POST /items``: exactly one of ``codes``, ``image_features``, ``text``."""

    codes: Annotated[list[Annotated[str, Field(min_length=1, max_length=16_384)]], Field(min_length=1)] | None = None
    image_features: Annotated[list[Annotated[list[Finite], Field(min_length=1)]], Field(min_length=1)] | None = None
    text: Annotated[list[Text], Field(min_length=1)] | Text | None = None
    ids: Annotated[list[Id], Field(min_length=1)] | None = Field(
        None, description="Ids of the new items (unique integers); by default row numbers.")
    items: Annotated[list[dict[str, Any] | None], Field(min_length=1)] | None = Field(
        None, description="One JSON object (or null) per new item, returned with it by searches.")
    attributes: dict[str, Annotated[list[Any], Field(min_length=1)]] | None = Field(
        None, description="Per attribute column of the index, one value per new item (label lists, "
                          "numbers, strings); a label set may be left out (no labels). Filters select on them.")
    index: Name | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        given = [f for f in ("codes", "image_features", "text") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of codes, image_features or text for the new items")
        return self


class RemoveRequest(_Strict):
    """``DELETE /items``."""

    ids: Annotated[list[Annotated[int, Field(strict=True)]], Field(min_length=1)]
    index: Name | None = None


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hit(_Reply):
    rank: int
    id: int
    distance: int = Field(description="Hamming distance to the query.")
    item: Any = Field(description="The payload stored with the item (null if none).")
    attributes: dict[str, Any] | None = Field(None, description="The item's attributes (indexes that store any).")
    score: float | None = Field(None, description="The matcher's score (re-ranked searches only).")


class SearchReply(_Reply):
    results: list[list[Hit]] = Field(description="Per query, its results, nearest (or best scored) first.")
    index: str
    query_modality: str | None
    known_words: list[str] | None
    unknown_words: list[str] | None
    warnings: list[str]
    encode_ms: float
    search_ms: float
    rerank_ms: float | None = None
    query_item: dict[str, Any] | None = None


class AddReply(_Reply):
    added: int
    ids: list[int]
    items: int = Field(description="Items alive in the index after the write.")
    index: str


class RemoveReply(_Reply):
    removed: int
    items: int
    index: str


class HealthReply(_Reply):
    status: Literal["ok", "degraded"]
    problem: str | None
    readonly: bool
    auth: bool = Field(description="Whether the API routes need a key.")
    indexes: dict[str, int]


class IndexInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    bits: int
    items: int
    query_modality: str | None
    model_ok: bool
    rerank: bool


class InfoReply(_Reply):
    readonly: bool
    indexes: list[IndexInfo]


class ErrorReply(_Reply):
    error: str = Field(description="One line naming the problem and the fix.")


# -- reading a body ---------------------------------------------------------------------------
def _no_constant(name):
    raise HashretError(f"the request body holds {name}, which JSON does not allow: send finite numbers")


def parse_body(raw: bytes) -> dict:
    """The JSON object in ``raw``: NaN and Infinity refused, nesting bounded (a deep body is
    one error line, not a RecursionError)."""
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise HashretError(f"the request body nests deeper than {MAX_DEPTH} levels: flatten it") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, HashretError):
            raise
        raise HashretError(f"the request body is not JSON ({exc}): send a JSON object") from None
    if not isinstance(obj, dict):
        raise HashretError("the request body must be a JSON object")
    if _depth(obj) > MAX_DEPTH:
        raise HashretError(f"the request body nests deeper than {MAX_DEPTH} levels: flatten it")
    return obj


def _depth(obj) -> int:
    """Nesting depth, walked without recursion and stopping once past the limit."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if d > deepest:
            deepest = d
            if deepest > MAX_DEPTH:
                return deepest
        if isinstance(x, dict):
            stack.extend((v, d + 1) for v in x.values() if isinstance(v, (dict, list)))
        elif isinstance(x, list):
            stack.extend((v, d + 1) for v in x if isinstance(v, (dict, list)))
    return deepest


_EXPECT = {
    "text": "a non-empty string or a list of them",
    "image_features": "a list of rows of finite numbers (region sets for a matcher: a list of lists of rows)",
    "item": "a row number or a key",
    "codes": "a non-empty list of hex strings (the packed bytes of each code)",
    "k": "an integer",
    "candidates": "an integer",
    "rerank": "true or false",
    "index": "an index name",
    "ids": "a non-empty list of integers in [0, 2**63)",
    "items": "a list with one JSON object (or null) per item",
}


def validate(model: type[BaseModel], body: dict, route: str):
    """``body`` as ``model``, or one HashretError line naming the field and what it takes."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        extra = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
        if extra:
            raise HashretError(f"unknown field(s) {', '.join(map(repr, extra))} for {route}: use "
                               f"{sorted(model.model_fields)}") from None
        first = errors[0]
        if not first["loc"]:  # the model's own rule (one query kind)
            raise HashretError(first["msg"].removeprefix("Value error, ")) from None
        field = str(first["loc"][0])
        where = "".join(f"[{p}]" for p in first["loc"][1:] if isinstance(p, int))
        detail = first["msg"][0].lower() + first["msg"][1:]
        raise HashretError(f"{field} must be {_EXPECT.get(field, 'valid')}"
                           + (f" ({field}{where}: {detail})" if where or first["type"] not in
                              ("int_type", "string_type", "list_type", "bool_type", "dict_type", "float_type")
                              else "")) from None


def check_budget(n_queries: int, k: int, limit: int):
    """A reply of ``n_queries`` x ``k`` results must stay within the server's budget."""
    if isinstance(k, int) and k > 0 and n_queries * k > limit:
        raise HashretError(f"this request asks for {n_queries * k} results ({n_queries} quer{'y' if n_queries == 1 else 'ies'} x k={k}), "
                           f"over this server's limit of {limit} (--max-results): ask for fewer queries or a "
                           "smaller k")


# -- no server paths in replies ----------------------------------------------------------------
_ABS_PATH = re.compile(r"(?<![\w/:.~])/(?:[^\s/'\"(),;]+/)+[^\s/'\"(),;]*")


def scrub(text: str) -> str:
    """``text`` with every absolute path of two or more parts cut to its last part: a reply
    names the index or checkpoint, never where it lives on the server."""
    return _ABS_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", text)


def scrub_tree(obj):
    """:func:`scrub` applied to every string of a JSON tree."""
    if isinstance(obj, str):
        return scrub(obj)
    if isinstance(obj, dict):
        return {k: scrub_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_tree(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
