"""The 32-byte BLAKE3 digest that names every blob, chunk and directory."""

from __future__ import annotations

import blake3

from nixcas.errors import InvalidDigestError

DIGEST_LEN = 32


class B3Digest(bytes):
    """A BLAKE3 digest: exactly 32 raw bytes.

    Being a ``bytes`` subclass it is hashable, compares by value and goes onto
    the wire as is.  ``str()`` gives the tvix display form ``b3:<base64>``;
    :meth:`parse` also accepts 64 hex digits and the snix form ``blake3-<base64>``.
    """

    __slots__ = ()

    def __new__(cls, raw: bytes | bytearray | memoryview) -> B3Digest:
        if len(raw) != DIGEST_LEN:
            raise InvalidDigestError(f"invalid digest length: {len(raw)} (want {DIGEST_LEN})")
        return super().__new__(cls, raw)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> B3Digest:
        """The digest of ``data``."""
        return cls(blake3.blake3(data).digest())

    @classmethod
    def parse(cls, text: str) -> B3Digest:
        """Parse ``<64 hex>``, ``b3:<base64>`` or ``blake3-<base64>``."""
        text = text.strip()
        for prefix in ("b3:", "blake3-"):
            if text.startswith(prefix):
                import base64  # (and re, which base64 loads): only for the base64 forms
                import binascii

                try:
                    raw = base64.b64decode(text[len(prefix) :], validate=True)
                except binascii.Error as e:
                    raise InvalidDigestError(f"invalid base64 in digest {text!r}: {e}") from None
                return cls(raw)
        if len(text) == 2 * DIGEST_LEN:
            try:
                return cls(bytes.fromhex(text))
            except ValueError:
                pass
        raise InvalidDigestError(
            f"cannot parse digest {text!r}: expected 64 hex digits, b3:<base64> or blake3-<base64>"
        )

    def b3(self) -> str:
        """tvix display form, ``b3:<base64>``."""
        import base64

        return "b3:" + base64.b64encode(self).decode()

    def blake3(self) -> str:
        """snix display form, ``blake3-<base64>``."""
        import base64

        return "blake3-" + base64.b64encode(self).decode()

    def __str__(self) -> str:
        return self.b3()

    def __repr__(self) -> str:
        return f"B3Digest({self.hex()})"


EMPTY_DIGEST = B3Digest.of(b"")
"""The digest of the empty blob, which is also the digest of the empty Directory."""

__all__ = ["DIGEST_LEN", "EMPTY_DIGEST", "B3Digest"]
