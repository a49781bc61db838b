"""NAR URLs that name castore content: ``nar/snix-castore/<root>?narsize=N`` (also ``tvix-castore``).

A nixcas, tvix or snix nar-bridge writes such a URL into every narinfo it
serves: ``<root>`` is the path's root node (a castore ``Node``/``Entry``
message with an empty name) in unpadded base64url, ``narsize`` the NAR's size.
The bridge renders the NAR from castore when the URL is fetched; a client with
access to the same castore can instead fetch the nodes it lacks and render
the NAR itself (see :mod:`nixcas.store.pathinfo.nixhttp`).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final
from urllib.parse import parse_qs, urlsplit

from nixcas.castore.nodes import Node
from nixcas.castore.proto import decode_node
from nixcas.errors import ValidationError
from nixcas.urls import is_decimal

__all__ = ["CASTORE_NAR_PREFIXES", "MAX_NODE_SIZE", "castore_nar_root", "decode_root_node"]

CASTORE_NAR_PREFIXES: Final = ("tvix-castore", "snix-castore")
MAX_NODE_SIZE: Final = 4096
"""Largest encoded root node accepted in a NAR URL (as tvix)."""
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def decode_root_node(encoded: str) -> Node:
    """The root node of a castore NAR URL's last path component; :class:`ValidationError` if it is not one."""
    if len(encoded) > MAX_NODE_SIZE * 4 // 3 + 4 or not _B64URL.fullmatch(encoded):
        raise ValidationError("invalid root node in NAR URL: not unpadded base64url (or too long)")
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except binascii.Error:
        raise ValidationError("invalid root node in NAR URL: bad base64url") from None
    try:
        return decode_node(raw, anonymous=True)[1]
    except ValidationError as e:
        raise ValidationError(f"invalid root node in NAR URL: {e}") from None


def castore_nar_root(url: str) -> tuple[Node, int | None] | None:
    """The root node and ``narsize`` of a castore NAR URL (relative or absolute); ``None`` for any other URL.

    A URL with a castore prefix whose node or ``narsize`` is malformed raises
    :class:`ValidationError`.
    """
    parts = urlsplit(url)
    segments = parts.path.split("/")
    if len(segments) < 3 or segments[-3] != "nar" or segments[-2] not in CASTORE_NAR_PREFIXES:
        return None
    node = decode_root_node(segments[-1])
    sizes = parse_qs(parts.query, keep_blank_values=True).get("narsize")
    if sizes is None:
        return node, None
    if len(sizes) != 1 or not is_decimal(sizes[0]) or len(sizes[0]) > 20:
        raise ValidationError("castore NAR URL: narsize must be one non-negative integer")
    return node, int(sizes[0])
