"""Canonical ``PathInfo`` bytes read and written without protobuf: what ``path-info`` needs to show one record.

Every record nixcas stores is the deterministic protobuf encoding of a valid
PathInfo; loading google.protobuf and the generated modules to read one costs
more than everything else ``nixcas path-info`` does.  :func:`decode_canonical`
reads exactly that encoding: each message's fields in field-number order,
a singular field at most once and never with its zero value, a repeated
field's elements together, every varint in its shortest form, strings valid
UTF-8, no unknown fields, and the root node in the canonical form
:func:`nixcas.castore.canonical.decode_canonical` reads (a ``Node`` message is
laid out as a ``Directory`` of one entry).  For anything else it returns
``None`` and :meth:`PathInfo.decode <nixcas.store.pathinfo.model.PathInfo.decode>`
uses protobuf.  What it reads is validated by
:meth:`PathInfo.from_parts <nixcas.store.pathinfo.model.PathInfo.from_parts>`,
the checks protobuf's path makes, so both give the same PathInfo or error.

:func:`encode_canonical` writes a PathInfo's record the same way (what
protobuf's deterministic serialization gives, which the tests check), so an
import stores its record without loading protobuf.
"""

from __future__ import annotations

from collections.abc import Mapping

from nixcas.castore.canonical import decode_canonical as decode_canonical_entries
from nixcas.castore.canonical import delimited, encode_entry, read_varint, varint
from nixcas.castore.nodes import Node
from nixcas.store.pathinfo.model import PathInfo

TYPE_CHECKING = False  # not typing's: `path-info` loads nothing else of it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["decode_canonical", "encode_canonical"]

_VARINT, _BYTES, _MESSAGE, _REPEATED = 0, 1, 2, 3
"""Field kinds: a varint, bytes or a string, a message (present even when empty), a repeated bytes/message field."""

_PATH_INFO = {1: _MESSAGE, 2: _REPEATED, 3: _MESSAGE}
"""PathInfo: node = 1, references = 2, narinfo = 3."""
_NAR_INFO = {1: _VARINT, 2: _BYTES, 3: _REPEATED, 4: _REPEATED, 5: _MESSAGE, 6: _MESSAGE}
"""NARInfo: nar_size = 1, nar_sha256 = 2, signatures = 3, reference_names = 4, deriver = 5, ca = 6."""
_NAMED_BYTES = {1: _BYTES, 2: _BYTES}
"""NARInfo.Signature (name = 1, data = 2) and StorePath (name = 1, digest = 2)."""
_CA = {1: _VARINT, 2: _BYTES}
"""NARInfo.CA: type = 1 (an enum: int32), digest = 2."""
_INT32_MAX = (1 << 31) - 1


def _fields(data: bytes, kinds: Mapping[int, int]) -> dict[int, Any] | None:
    """A message's fields by number (a list for a repeated one); ``None`` unless canonical and known."""
    fields: dict[int, Any] = {}
    pos = 0
    end = len(data)
    last = 0
    while pos < end:
        tag, pos = read_varint(data, pos, end)
        kind = kinds.get(tag >> 3, -1)
        if tag < 0 or kind < 0 or tag & 7 != (0 if kind == _VARINT else 2):
            return None
        number = tag >> 3
        if number < last or (number == last and kind != _REPEATED):
            return None  # out of order, or a singular field twice
        last = number
        if kind == _VARINT:
            value, pos = read_varint(data, pos, end)
            if value <= 0:  # zero is left out, not written
                return None
            fields[number] = value
            continue
        length, pos = read_varint(data, pos, end)
        if length < 0 or pos + length > end:
            return None
        raw = data[pos : pos + length]
        pos += length
        if kind == _REPEATED:
            fields.setdefault(number, []).append(raw)
        elif kind == _BYTES and not raw:
            return None
        else:
            fields[number] = raw
    return fields


def decode_canonical(data: bytes) -> PathInfo | None:
    """The PathInfo of canonical ``PathInfo`` bytes, validated; ``None`` if they are not canonical.

    Raises :class:`~nixcas.errors.PathInfoError` as :meth:`PathInfo.from_proto` does for
    canonical bytes of an invalid PathInfo.
    """
    top = _fields(data, _PATH_INFO)
    if top is None or 1 not in top or 3 not in top:
        return None  # protobuf's path says what is missing
    info = _fields(top[3], _NAR_INFO)
    entries = decode_canonical_entries(top[1])
    if info is None or entries is None or len(entries) != 1:
        return None
    root: tuple[bytes, Node] = entries[0]
    try:
        names = [raw.decode() for raw in info.get(4, [])]
        signatures: list[tuple[str, bytes]] = []
        for raw in info.get(3, []):
            signature = _fields(raw, _NAMED_BYTES)
            if signature is None:
                return None
            signatures.append((signature.get(1, b"").decode(), signature.get(2, b"")))
        deriver: tuple[str, bytes] | None = None
        if 5 in info:
            path = _fields(info[5], _NAMED_BYTES)
            if path is None:
                return None
            deriver = (path.get(1, b"").decode(), path.get(2, b""))
    except UnicodeDecodeError:  # protobuf refuses a string that is not UTF-8
        return None
    ca: tuple[int, bytes] | None = None
    if 6 in info:
        address = _fields(info[6], _CA)
        if address is None or address.get(1, 0) > _INT32_MAX:
            return None
        ca = (address.get(1, 0), address.get(2, b""))
    return PathInfo.from_parts(
        references=top.get(2, []),
        reference_names=names,
        root=lambda: root,
        nar_size=info.get(1, 0),
        nar_sha256=info.get(2, b""),
        signatures=signatures,
        deriver=deriver,
        ca=ca,
    )


def _field(number: int, value: bytes) -> bytes:
    """A length-delimited field (numbers 1 to 15: a one-byte tag)."""
    return delimited(number << 3 | 2, value)


def _named(name: str, data: bytes) -> bytes:
    """``NARInfo.Signature`` / ``StorePath``: name = 1, then data (or digest) = 2, each left out when empty."""
    raw = name.encode()
    return (_field(1, raw) if raw else b"") + (_field(2, data) if data else b"")


def encode_canonical(info: PathInfo) -> bytes:
    """The record of ``info``: the bytes ``PathInfo.to_proto().SerializeToString(deterministic=True)`` gives."""
    tag, entry = encode_entry(info.store_path.basename.encode(), info.node)
    narinfo = [
        b"\x08" + varint(info.nar_size) if info.nar_size else b"",
        _field(2, info.nar_sha256) if info.nar_sha256 else b"",
    ]
    narinfo.extend(_field(3, _named(sig.name, sig.data)) for sig in info.signatures)
    narinfo.extend(_field(4, ref.basename.encode()) for ref in info.references)
    if info.deriver is not None:
        narinfo.append(_field(5, _named(info.deriver.name, info.deriver.digest)))
    if info.ca is not None:
        kind = info.ca.proto_type
        ca = (b"\x08" + varint(kind) if kind else b"") + (
            _field(2, info.ca.hash.digest) if info.ca.hash.digest else b""
        )
        narinfo.append(_field(6, ca))
    parts = [_field(1, delimited(tag, entry))]
    parts.extend(_field(2, ref.digest) for ref in info.references)
    parts.append(_field(3, b"".join(narinfo)))
    return b"".join(parts)
