"""Bridge tokens: who may read and who may write, from a token file the bridge reloads on SIGHUP.

A token file holds one token per line; blank lines and lines starting with
``#`` are ignored::

    # SCOPE  TOKEN                         [NAME]
    write    3q2+7w9kP0Nn1yXh0b5hVQ        ci
    read     Yx4sQ1fJ0m8c2Zr6uHk3eA        alice
    read     b9Jx0Rq3mK2vT7nW1pLs5g

``SCOPE`` is ``read`` (may download when the cache is ``--private``) or
``write`` (may also upload); ``NAME`` (letters, digits, ``._@+-``, at most 64)
is what access logs show for the token, ``line-N`` if not given.  A line with
the token alone (the original one-token file) is a ``write`` token.

A request carries a token as ``Authorization: Bearer TOKEN``, or as the
password of HTTP Basic auth (any user name): what Nix sends from its
``netrc-file``.  Tokens are compared by their SHA-256, against every token of
the file, in constant time; a token's secret is never logged or echoed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from nixcas.errors import ConfigurationError

__all__ = ["SCOPES", "Scope", "Token", "Tokens", "presented_secret", "reload_tokens"]

log = logging.getLogger("nixcas.bridge")

Scope = Literal["read", "write"]
SCOPES: Final[tuple[Scope, ...]] = ("read", "write")
MAX_TOKEN_FILE: Final = 1 << 20
"""Bytes of a token file read at most (a few thousand tokens)."""
_NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")


@dataclass(frozen=True)
class Token:
    """One token: its name (safe to log), its scope and the SHA-256 of its secret."""

    name: str
    scope: Scope
    digest: bytes = field(repr=False)

    @classmethod
    def make(cls, secret: str, scope: Scope = "write", name: str = "token") -> Token:
        return cls(name, scope, hashlib.sha256(secret.encode()).digest())

    @property
    def can_write(self) -> bool:
        return self.scope == "write"


class Tokens:
    """An immutable set of tokens; :meth:`identify` finds the one a request's ``Authorization`` carries."""

    def __init__(self, tokens: list[Token], source: str = "tokens") -> None:
        self.tokens = tuple(tokens)
        self.source = source

    def __repr__(self) -> str:
        return f"Tokens({self.source}: {', '.join(f'{t.name} ({t.scope})' for t in self.tokens)})"

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def can_write(self) -> bool:
        """Whether some token may write."""
        return any(t.can_write for t in self.tokens)

    @classmethod
    def single(cls, secret: str) -> Tokens:
        """One ``write`` token (the bridge's ``token=`` argument)."""
        return cls([Token.make(secret)])

    @classmethod
    def load(cls, path: str | Path) -> Tokens:
        """The tokens of the file ``path``; :class:`ConfigurationError` (naming no secret) if it is unusable."""
        where = f"--token-file {path}"
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_TOKEN_FILE + 1)
        except OSError as e:
            raise ConfigurationError(f"{where}: {e.strerror or e}") from None
        if len(raw) > MAX_TOKEN_FILE:
            raise ConfigurationError(f"{where}: larger than {MAX_TOKEN_FILE} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigurationError(f"{where}: not UTF-8 (at byte {e.start})") from None
        return cls.parse(text, where)

    @classmethod
    def parse(cls, text: str, where: str = "token file") -> Tokens:
        """The tokens of a token file's ``text`` (see the module); errors name the line, never the token."""
        tokens: list[Token] = []
        names: set[str] = set()
        digests: set[bytes] = set()
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) == 1:
                scope, secret, name = "write", fields[0], None
            elif len(fields) <= 3:
                scope, secret = fields[0], fields[1]
                name = fields[2] if len(fields) == 3 else None
            else:
                raise ConfigurationError(
                    f"{where}: line {number}: expected SCOPE TOKEN [NAME], got {len(fields)} fields"
                )
            if scope not in SCOPES:
                raise ConfigurationError(  # the field is not shown: it may be a token written first
                    f"{where}: line {number}: the first field must be the scope, 'read' or 'write' (SCOPE TOKEN [NAME])"
                )
            if name is None:
                name = f"line-{number}"
            elif not _NAME.fullmatch(name):
                raise ConfigurationError(
                    f"{where}: line {number}: a token name has 1 to 64 letters, digits or ._@+- characters"
                )
            if name in names:
                raise ConfigurationError(f"{where}: line {number}: the name {name!r} is used twice")
            token = Token.make(secret, scope, name)
            if token.digest in digests:
                raise ConfigurationError(f"{where}: line {number}: the same token appears twice")
            names.add(name)
            digests.add(token.digest)
            tokens.append(token)
        if not tokens:
            raise ConfigurationError(f"{where}: the file is empty (no token in it)")
        return cls(tokens, where.removeprefix("--token-file "))

    def identify(self, authorization: str | None) -> Token | None:
        """The token ``authorization`` (an ``Authorization`` header) carries, if it is one of these."""
        secret = presented_secret(authorization)
        if secret is None:
            return None
        given = hashlib.sha256(secret).digest()
        found = None
        for token in self.tokens:  # every token is compared: the time does not tell which one matched
            if hmac.compare_digest(given, token.digest):
                found = token
        return found


def presented_secret(authorization: str | None) -> bytes | None:
    """The secret of an ``Authorization`` header: ``Bearer SECRET``, or Basic with SECRET as the password."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value.encode("utf-8", "surrogateescape") if value else None  # header bytes as aiohttp read them
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        password = decoded.partition(b":")[2]
        return password or None
    return None


def reload_tokens(current: Tokens, path: str | Path) -> Tokens:
    """The tokens of ``path`` now; ``current`` if the file became unusable (logged: the old tokens stay)."""
    try:
        tokens = Tokens.load(path)
    except ConfigurationError as e:
        log.error("tokens not reloaded, %d kept: %s", len(current), e)
        return current
    log.info("tokens reloaded from %s: %s", path, ", ".join(f"{t.name} ({t.scope})" for t in tokens.tokens))
    return tokens
