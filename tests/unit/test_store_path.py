"""nixbase32, Nix hashes, content addresses and store paths against known vectors (and Nix, if installed)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from nixcas.errors import NixbaseError, StorePathError, ValidationError
from nixcas.store import nixbase32
from nixcas.store.hashes import CAHash, CAKind, HashAlgo, NixHash
from nixcas.store.store_path import (
    DIGEST_SIZE,
    MAX_NAME_LEN,
    STORE_DIR,
    StorePath,
    build_ca_path,
    build_nar_path,
    build_text_path,
    compress_hash,
    make_store_path,
    validate_name,
)
from nixcas.testing.nix import NIX_HASH, NIX_INSTANTIATE, NIX_STORE, needs_nix, run_nix

VECTORS_FILE = Path(__file__).parents[1] / "data" / "vectors.json"

# --- literal facts (reference §10.3 / §10.4, and values printed by Nix 2.8 on this machine) ---

NIXBASE32_VECTORS = [
    ("", ""),
    ("1f", "0z"),
    ("8a12321522fd91efbd60ebb2481af88580f61600", "00bgd045z0d4icpbc2yyz4gx48ak44la"),
    (
        "b3a24de97a8fdbc835b9833169501030b8977031bcb54b3b3ac13740f846ab30",
        "0c5b8vw40dy178xlpddw65q9gf1h2186jcc3p4swinwggbllv8mk",
    ),
]
NIXBASE32_INVALID = ["zz", "c0", "0", "0zz"]

HELLOWORLD_NAR_SHA256 = "03e7f63be30b065d78bcf615f5473545fdb4eb69aa416f43495b4e05cdfb8040"
HELLOWORLD_NAR_SHA256_NIX32 = "0h40zg6hakjv951nyhdad7mv9za56m3za5gnpiw5s1hbwcxzdrq3"
HELLOWORLD_NAR_SHA256_SRI = "sha256-A+f2O+MLBl14vPYV9Uc1Rf2062mqQW9DSVtOBc37gEA="  # `nix hash to-sri`

# NAR sha256 of the §10.3 fixtures and the path `nix-store --add` gives them.
NAR_IMPORT_PATHS = [
    (
        "symlink",
        "097d397e9b5826384eaa16c457715d1c1a51670313ead0f58566e0b232539cf1",
        "/nix/store/11i0w7x0adl6iyydsilpl0nc8v1zc2m4-symlink",
    ),
    ("helloworld", HELLOWORLD_NAR_SHA256, "/nix/store/vf9s1dz1a2nbnnilsxnaa3ri1c0m9kwg-helloworld"),
    (
        "complicated",
        "ebd52279a8df024c9fd5718de4103bf5e760dc7f2cf49044ee7dea87ab16911a",
        "/nix/store/pngqdzggfqs4q7fg6iywqnlzcgsp85qr-complicated",
    ),
]
NAR_NIX32 = {
    "097d397e9b5826384eaa16c457715d1c1a51670313ead0f58566e0b232539cf1": (
        "1wcwacrb5q36hpsx1shk0dkm26hwbmqmgi0nm973h9jqkdz3jz89"
    ),
    HELLOWORLD_NAR_SHA256: HELLOWORLD_NAR_SHA256_NIX32,
    "ebd52279a8df024c9fd5718de4103bf5e760dc7f2cf49044ee7dea87ab16911a": (
        "06li2smqgskxxr291x1cgzf61rzm7c8f93bisnglq0nzm1wj5mgb"
    ),
}

TEXT_FOO = "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo"
TEXT_BAZ = "/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz"
FIXED_SHA1_BAR = "/nix/store/mp57d33657rf34lzvlbpfa1gjfv5gmpg-bar"
NAR_SHA256_BAZ = "/nix/store/s89y431zzhmdn3k8r96rvakryddkpv2v-baz"
NAR_SHA256_BAZ_REF = "/nix/store/dxwkwjzdaq7ka55pkk252gh32bgpmql4-foo"

# `nix-store --add-fixed [--recursive] <algo> helloworld` for a file holding b"Hello World!" (Nix 2.8).
HELLO = b"Hello World!"
FLAT_HELLOWORLD_PATHS = {
    HashAlgo.SHA256: "/nix/store/53fn6f2is6kaplds62zzkvyb79fkj51f-helloworld",
    HashAlgo.SHA1: "/nix/store/rp58c4cagqsibxwgr055cnlirbypcjif-helloworld",
    HashAlgo.MD5: "/nix/store/1bxr9gimiqm5wxw6174pc3rhghp3y5sm-helloworld",
}
HELLO_MD5 = "ed076287532e86365e841e92bfc50d8c"
HELLO_SHA256 = "7f83b1657ff1fc53b92dc18148a1d65dfc2d4b1fa3d677284addd200126d9069"

NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-_?=."


def _slow_nixbase32(data: bytes) -> str:
    """Bit-by-bit nixbase32, written straight from the definition (independent of the module)."""
    length = (len(data) * 8 + 4) // 5
    value = int.from_bytes(data, "little")
    return "".join(nixbase32.ALPHABET[(value >> (5 * (length - 1 - k))) & 31] for k in range(length))


def _rng(seed: int | str) -> random.Random:
    """A seeded generator for reproducible test data (not for anything secret)."""
    return random.Random(seed)  # noqa: S311


def _load_vectors() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(VECTORS_FILE.read_text())
    return loaded


# ============================================================== nixbase32


def test_alphabet() -> None:
    assert nixbase32.ALPHABET == "0123456789abcdfghijklmnpqrsvwxyz"
    assert len(set(nixbase32.ALPHABET)) == 32
    assert sorted(nixbase32.ALPHABET) == list(nixbase32.ALPHABET)
    assert not set("eotu") & set(nixbase32.ALPHABET)


@pytest.mark.parametrize(("hex_", "text"), NIXBASE32_VECTORS)
def test_nixbase32_vectors(hex_: str, text: str) -> None:
    assert nixbase32.encode(bytes.fromhex(hex_)) == text
    assert nixbase32.decode(text) == bytes.fromhex(hex_)
    assert nixbase32.decode(text.encode()) == bytes.fromhex(hex_)


@pytest.mark.parametrize("text", [*NIXBASE32_INVALID, "e0", "o0", "u0", "t0", "0Z", "0-", " 0z", "0z\n", "é0"])
def test_nixbase32_invalid(text: str) -> None:
    with pytest.raises(NixbaseError):
        nixbase32.decode(text)
    assert not nixbase32.is_valid(text)


def test_nixbase32_invalid_bytes() -> None:
    with pytest.raises(NixbaseError, match="non-ASCII"):
        nixbase32.decode(b"0\xff")
    with pytest.raises(NixbaseError, match=r"character 'e' at position 31"):
        nixbase32.decode("0" * 31 + "e")


def test_nixbase32_nar_str_hash() -> None:
    # parse_nar_str("14cx…za0k.nar.xz"): the 52-character hash part of a NAR file name.
    text = "14cx20k6z4hq508kqi2lm79qfld5f9mf7kiafpqsjs3zlmycza0k"
    digest = bytes.fromhex("13a8cf7ca57f68a9f1752acee36a72a55187d3a954443c112818926f26109d91")
    assert nixbase32.decode(text) == digest
    assert nixbase32.encode(digest) == text


def test_nixbase32_nar_fixture_hashes() -> None:
    for hex_, text in NAR_NIX32.items():
        assert nixbase32.encode(bytes.fromhex(hex_)) == text
        assert nixbase32.decode(text).hex() == hex_


def test_nixbase32_lengths() -> None:
    assert [nixbase32.encoded_len(n) for n in (0, 1, 2, 16, 20, 32, 64)] == [0, 2, 4, 26, 32, 52, 103]
    assert nixbase32.decoded_len(32) == 20
    assert nixbase32.decoded_len(52) == 32
    assert nixbase32.decoded_len(103) == 64
    valid = {nixbase32.encoded_len(n) for n in range(200)}
    for length in range(300):
        assert (nixbase32.encoded_len(nixbase32.decoded_len(length)) == length) == (length in valid)
        if length not in valid:
            with pytest.raises(NixbaseError, match="length"):
                nixbase32.decode("0" * length)
    with pytest.raises(ValueError, match="negative"):
        nixbase32.encoded_len(-1)
    with pytest.raises(ValueError, match="negative"):
        nixbase32.decoded_len(-1)


def test_nixbase32_round_trip_random() -> None:
    rng = _rng(1234)
    for length in range(130):
        for _ in range(20):
            data = rng.randbytes(length)
            text = nixbase32.encode(data)
            assert len(text) == nixbase32.encoded_len(length)
            assert text == _slow_nixbase32(data)
            assert nixbase32.decode(text) == data
    # Extremes.
    for length in (1, 19, 20, 32, 64):
        assert nixbase32.decode(nixbase32.encode(b"\xff" * length)) == b"\xff" * length
        assert nixbase32.encode(b"\x00" * length) == "0" * nixbase32.encoded_len(length)


def test_nixbase32_overflow_bits_rejected() -> None:
    # For every length whose encoding has spare bits, setting them must fail.
    for n in range(1, 40):
        length = nixbase32.encoded_len(n)
        spare = 5 * length - 8 * n
        if spare == 0:
            continue
        top = nixbase32.ALPHABET[1 << (5 - spare)]
        with pytest.raises(NixbaseError, match="non-zero bits"):
            nixbase32.decode(top + "0" * (length - 1))
        # The largest allowed first digit is fine.
        ok = nixbase32.ALPHABET[(1 << (5 - spare)) - 1]
        assert nixbase32.decode(ok + "z" * (length - 1)) == b"\xff" * n


# ============================================================== HashAlgo / NixHash


def test_hash_algo() -> None:
    assert [a.value for a in HashAlgo] == ["md5", "sha1", "sha256", "sha512"]
    assert [a.digest_size for a in HashAlgo] == [16, 20, 32, 64]
    for algo in HashAlgo:
        h = algo.new()
        h.update(HELLO)
        assert h.digest() == hashlib.new(algo.value, HELLO).digest()
        assert h.digest_size == algo.digest_size
    assert HashAlgo.parse("sha256") is HashAlgo.SHA256
    assert str(HashAlgo.SHA1) == "sha1"
    for bad in ("SHA256", "sha3", "", "blake3"):
        with pytest.raises(NixbaseError, match="unknown hash algorithm"):
            HashAlgo.parse(bad)


def test_nix_hash_helloworld_forms() -> None:
    h = NixHash(HashAlgo.SHA256, bytes.fromhex(HELLOWORLD_NAR_SHA256))
    assert h.to_nix32() == f"sha256:{HELLOWORLD_NAR_SHA256_NIX32}"
    assert str(h) == h.to_nix32()
    assert h.hex() == HELLOWORLD_NAR_SHA256
    assert h.to_base16() == f"sha256:{HELLOWORLD_NAR_SHA256}"
    assert h.to_sri() == HELLOWORLD_NAR_SHA256_SRI
    assert h.nix32() == HELLOWORLD_NAR_SHA256_NIX32
    assert repr(h) == f"NixHash('sha256:{HELLOWORLD_NAR_SHA256_NIX32}')"
    forms = [
        f"sha256:{HELLOWORLD_NAR_SHA256_NIX32}",
        f"sha256:{HELLOWORLD_NAR_SHA256}",
        f"sha256:{HELLOWORLD_NAR_SHA256.upper()}",
        f"sha256:{HELLOWORLD_NAR_SHA256_SRI.removeprefix('sha256-')}",
        HELLOWORLD_NAR_SHA256_SRI,
    ]
    for form in forms:
        assert NixHash.parse(form) == h
        assert NixHash.parse(form, HashAlgo.SHA256) == h
    for bare in (HELLOWORLD_NAR_SHA256_NIX32, HELLOWORLD_NAR_SHA256, HELLOWORLD_NAR_SHA256_SRI.removeprefix("sha256-")):
        assert NixHash.parse(bare, HashAlgo.SHA256) == h


def test_nix_hash_of() -> None:
    assert NixHash.of(HashAlgo.MD5, HELLO).hex() == HELLO_MD5
    assert NixHash.of(HashAlgo.SHA256, HELLO).hex() == HELLO_SHA256
    assert NixHash.of(HashAlgo.SHA1, b"foo").hex() == "0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33"


def test_nix_hash_all_encodings_random() -> None:
    rng = _rng(99)
    for algo in HashAlgo:
        for _ in range(25):
            digest = rng.randbytes(algo.digest_size)
            h = NixHash(algo, digest)
            b64 = base64.b64encode(digest).decode()
            encodings = [digest.hex(), digest.hex().upper(), nixbase32.encode(digest), b64]
            for enc in encodings:
                assert NixHash.parse(f"{algo}:{enc}") == h
                assert NixHash.parse(enc, algo) == h
            assert NixHash.parse(f"{algo}-{b64}") == h
            assert NixHash.parse(h.to_nix32()) == h
            assert NixHash.parse(h.to_sri()) == h
            assert NixHash.parse(h.to_base16()) == h
            assert len(h.to_nix32()) == len(str(algo)) + 1 + nixbase32.encoded_len(algo.digest_size)


@pytest.mark.parametrize(
    ("text", "algo", "match"),
    [
        (f"sha256:{HELLOWORLD_NAR_SHA256[:-2]}", None, "length 62"),
        (f"sha256:{HELLOWORLD_NAR_SHA256}00", None, "length 66"),
        (f"sha256:{HELLOWORLD_NAR_SHA256_NIX32[:-1]}", None, "length 51"),
        ("sha1:" + HELLOWORLD_NAR_SHA256, None, "length 64"),
        ("sha256:" + "g" * 64, None, "not hexadecimal"),
        ("sha256:" + "e" * 52, None, "not in the alphabet"),
        ("sha256:" + "z" * 52, None, "non-zero bits"),
        ("sha256:" + "!" * 43 + "=", None, "base64"),
        ("sha256:", None, "length 0"),
        ("md6:" + "0" * 32, None, "unknown hash algorithm"),
        ("SHA256:" + HELLOWORLD_NAR_SHA256, None, "unknown hash algorithm"),
        (HELLOWORLD_NAR_SHA256, None, "no algorithm"),
        (HELLOWORLD_NAR_SHA256_NIX32, None, "no algorithm"),
        ("", None, "no algorithm"),
        ("sha256-" + HELLOWORLD_NAR_SHA256, None, "base64 digest is 44 characters"),
        ("sha256-" + HELLOWORLD_NAR_SHA256_NIX32, None, "base64 digest is 44 characters"),
        ("sha256-" + HELLOWORLD_NAR_SHA256_SRI[7:-1], None, "base64 digest is 44 characters"),
        ("sha512-" + HELLOWORLD_NAR_SHA256_SRI[7:], None, "base64 digest is 88 characters"),
        ("foo-" + HELLOWORLD_NAR_SHA256_SRI[7:], None, "unknown hash algorithm"),
        (HELLOWORLD_NAR_SHA256_SRI, HashAlgo.SHA512, "expected a sha512 hash"),
        (f"sha256:{HELLOWORLD_NAR_SHA256}", HashAlgo.SHA1, "expected a sha1 hash"),
        (HELLOWORLD_NAR_SHA256, HashAlgo.SHA1, "length 64"),
        (HELLOWORLD_NAR_SHA256[:-1], HashAlgo.SHA256, "length 63"),
    ],
)
def test_nix_hash_parse_errors(text: str, algo: HashAlgo | None, match: str) -> None:
    with pytest.raises(NixbaseError, match=match):
        NixHash.parse(text, algo)


def test_nix_hash_wrong_digest_length() -> None:
    for algo in HashAlgo:
        for size in (0, algo.digest_size - 1, algo.digest_size + 1):
            with pytest.raises(NixbaseError, match=f"{algo} digest is {algo.digest_size} bytes"):
                NixHash(algo, b"\0" * size)
    with pytest.raises(NixbaseError):
        NixHash.parse(b"sha256:00")  # type: ignore[arg-type]
    assert issubclass(NixbaseError, ValidationError)


def test_nix_hash_is_value_object() -> None:
    a = NixHash.parse(HELLOWORLD_NAR_SHA256_SRI)
    b = NixHash.parse(f"sha256:{HELLOWORLD_NAR_SHA256}")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert NixHash(HashAlgo.SHA1, b"\0" * 20) != NixHash(HashAlgo.SHA256, b"\0" * 32)


# ============================================================== CAHash


def _all_ca_hashes(rng: random.Random) -> list[tuple[CAHash, int]]:
    out = []
    table = [
        (CAKind.NAR, HashAlgo.SHA256, 0),
        (CAKind.NAR, HashAlgo.SHA1, 1),
        (CAKind.NAR, HashAlgo.SHA512, 2),
        (CAKind.NAR, HashAlgo.MD5, 3),
        (CAKind.TEXT, HashAlgo.SHA256, 4),
        (CAKind.FLAT, HashAlgo.SHA1, 5),
        (CAKind.FLAT, HashAlgo.MD5, 6),
        (CAKind.FLAT, HashAlgo.SHA256, 7),
        (CAKind.FLAT, HashAlgo.SHA512, 8),
    ]
    for kind, algo, proto in table:
        out.append((CAHash(kind, NixHash(algo, rng.randbytes(algo.digest_size))), proto))
    return out


def test_ca_hash_render_parse_all_kinds() -> None:
    rng = _rng(7)
    for _ in range(10):
        for ca, proto in _all_ca_hashes(rng):
            text = str(ca)
            prefix = {CAKind.NAR: "fixed:r:", CAKind.FLAT: "fixed:", CAKind.TEXT: "text:"}[ca.kind]
            assert text == f"{prefix}{ca.hash.algo}:{nixbase32.encode(ca.hash.digest)}"
            assert CAHash.parse(text) == ca
            # Nix also accepts hex and base64 for the digest part; rendering is always nixbase32.
            assert CAHash.parse(f"{prefix}{ca.hash.algo}:{ca.hash.hex()}") == ca
            assert CAHash.parse(f"{prefix}{ca.hash.algo}:{ca.hash.base64()}") == ca
            assert ca.proto_type == proto
            assert CAHash.from_proto(proto, ca.hash.digest) == ca
            assert repr(ca) == f"CAHash({text!r})"


def test_ca_hash_known_values() -> None:
    ca = CAHash.parse("fixed:r:sha256:" + "0" * 52)  # the PATH_INFO vector's CA
    assert ca == CAHash.nar(HashAlgo.SHA256, b"\0" * 32)
    assert ca.proto_type == 0
    sha1 = CAHash.parse("fixed:r:sha1:0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33")
    assert sha1.kind is CAKind.NAR
    assert sha1.hash.hex() == "0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33"
    assert str(sha1) == "fixed:r:sha1:" + nixbase32.encode(bytes.fromhex("0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33"))
    text = CAHash.text(hashlib.sha256(b"bar").digest())
    assert CAHash.parse(str(text)) == text
    assert str(text).startswith("text:sha256:")
    flat = CAHash.flat(HashAlgo.MD5, bytes.fromhex(HELLO_MD5))
    assert str(flat) == "fixed:md5:" + nixbase32.encode(bytes.fromhex(HELLO_MD5))
    assert CAKind.NAR.value == "fixed:r:"
    assert CAKind.FLAT.value == "fixed:"
    assert CAKind.TEXT.value == "text:"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "invalid content address"),
        ("fixed", "invalid content address"),
        ("fixed:r:sha256", "expected '<algo>:<hash>'"),
        ("text:sha256", "expected '<algo>:<hash>'"),
        ("text:sha1:" + "0" * 32, "must use sha256"),
        ("text:md5:" + "0" * 26, "must use sha256"),
        ("output:sha256:" + "0" * 52, "invalid content address"),
        ("fixed:r:md6:" + "0" * 52, "unknown hash algorithm"),
        ("fixed:r:sha256:" + "0" * 51, "length 51"),
        ("fixed:sha256:" + "z" * 52, "non-zero bits"),
        ("fixed:r:sha256-" + HELLOWORLD_NAR_SHA256_SRI[7:], "expected '<algo>:<hash>'"),
        ("fixed:r:" + HELLOWORLD_NAR_SHA256_SRI, "expected '<algo>:<hash>'"),
        ("fixed:r:sha256:" + HELLOWORLD_NAR_SHA256_SRI, "length 51"),
        ("FIXED:r:sha256:" + "0" * 52, "invalid content address"),
        ("fixed:R:sha256:" + "0" * 52, "unknown hash algorithm"),
        ("fixed:r:sha256:" + "0" * 52 + " ", "length 53"),
    ],
)
def test_ca_hash_parse_errors(text: str, match: str) -> None:
    with pytest.raises(NixbaseError, match=match):
        CAHash.parse(text)


def test_ca_hash_construction_errors() -> None:
    with pytest.raises(NixbaseError, match="text content address must use sha256"):
        CAHash(CAKind.TEXT, NixHash(HashAlgo.SHA1, b"\0" * 20))
    with pytest.raises(NixbaseError, match=r"unknown NARInfo\.CA hash type 9"):
        CAHash.from_proto(9, b"\0" * 32)
    with pytest.raises(NixbaseError, match="sha256 digest is 32 bytes"):
        CAHash.from_proto(0, b"\0" * 20)
    with pytest.raises(NixbaseError):
        CAHash.parse(b"fixed:r:sha256:" + b"0" * 52)  # type: ignore[arg-type]


# ============================================================== names


@pytest.mark.parametrize(
    "name", ["a", "foo", ".gitignore", ".", "..", "-", "x" * MAX_NAME_LEN, NAME_CHARS, "hello-2.12.1", "?=_+"]
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name
    assert validate_name(name.encode()) == name


@pytest.mark.parametrize(
    ("name", "pos", "char"),
    [
        ("a b", 1, "' '"),
        ("a/b", 1, "'/'"),
        ("ab\0", 2, "'\\x00'"),
        ("x\ny", 1, "'\\n'"),
        ("\tx", 0, "'\\t'"),
        ("foo@1", 3, "'@'"),
        ("a#", 1, "'#'"),
        ("a%20", 1, "'%'"),
        ("~a", 0, "'~'"),
        ("a!", 1, "'!'"),
        ("a:b", 1, "':'"),
        ("a,b", 1, "','"),
        ("a;b", 1, "';'"),
        ("a(b)", 1, "'('"),
        ("a*", 1, "'*'"),
        ("a'b", 1, '"\'"'),
        ('a"b', 1, "'\"'"),
        ("a\\b", 1, "'\\\\'"),
        ("a[b", 1, "'['"),
        ("a{b", 1, "'{'"),
        ("a<b", 1, "'<'"),
        ("a|b", 1, "'|'"),
        ("a$b", 1, "'$'"),
        ("a&b", 1, "'&'"),
        ("a^b", 1, "'^'"),
        ("a`b", 1, "'`'"),
        ("\x7f", 0, "'\\x7f'"),
        ("caf\u00e9", 3, "'\u00e9'"),
        ("\u2603x", 0, "'\u2603'"),
    ],
)
def test_invalid_name_characters(name: str, pos: int, char: str) -> None:
    with pytest.raises(StorePathError, match="not allowed") as info:
        validate_name(name)
    message = str(info.value)
    assert f"character {char} at position {pos} is not allowed" in message
    assert "allowed: A-Z a-z 0-9 + - _ ? = ." in message
    with pytest.raises(StorePathError, match=f"position {pos}"):
        validate_name(name.encode())


def test_invalid_name_message_exact() -> None:
    with pytest.raises(StorePathError) as info:
        validate_name("a b")
    assert str(info.value) == (
        "invalid store path name 'a b': character ' ' at position 1 is not allowed (allowed: A-Z a-z 0-9 + - _ ? = .)"
    )


def test_invalid_name_bytes_and_lengths() -> None:
    with pytest.raises(StorePathError, match=r"byte 0xff at position 2 is not allowed"):
        validate_name(b"ab\xff")
    with pytest.raises(StorePathError, match="must not be empty"):
        validate_name("")
    with pytest.raises(StorePathError, match="must not be empty"):
        validate_name(b"")
    with pytest.raises(StorePathError, match=f"212 bytes long, at most {MAX_NAME_LEN}"):
        validate_name("x" * 212)
    with pytest.raises(StorePathError, match="212 bytes long"):
        validate_name(b"x" * 212)
    with pytest.raises(StorePathError, match="must be str or bytes"):
        validate_name(12)  # type: ignore[arg-type]
    assert MAX_NAME_LEN == 211
    assert issubclass(StorePathError, ValidationError)


# ============================================================== StorePath


@pytest.mark.parametrize(("name", "nar_sha256", "path"), NAR_IMPORT_PATHS)
def test_nar_import_paths(name: str, nar_sha256: str, path: str) -> None:
    got = build_nar_path(name, bytes.fromhex(nar_sha256))
    assert got.absolute_path == path
    assert build_ca_path(name, CAHash.nar(HashAlgo.SHA256, bytes.fromhex(nar_sha256))) == got
    assert build_ca_path(name, CAHash.parse(f"fixed:r:sha256:{NAR_NIX32[nar_sha256]}")) == got


def test_text_paths() -> None:
    foo = build_text_path("foo", b"bar")
    assert foo.absolute_path == TEXT_FOO
    baz = build_text_path("baz", TEXT_FOO.encode(), [foo])
    assert baz.absolute_path == TEXT_BAZ
    assert build_ca_path("baz", CAHash.text(hashlib.sha256(TEXT_FOO.encode()).digest()), [foo]) == baz
    # Duplicate references collapse.
    assert build_text_path("baz", TEXT_FOO.encode(), [foo, foo]) == baz


def test_fixed_sha1_path() -> None:
    ca = CAHash.parse("fixed:r:sha1:0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33")
    assert build_ca_path("bar", ca).absolute_path == FIXED_SHA1_BAR


def test_nar_sha256_path_with_reference() -> None:
    ca = CAHash.parse("fixed:r:sha256:1xqkzcb3909fp07qngljr4wcdnrh1gdam1m2n29i6hhrxlmkgkv1")
    ref = StorePath.parse(NAR_SHA256_BAZ_REF)
    assert build_ca_path("baz", ca, [ref]).absolute_path == NAR_SHA256_BAZ
    assert build_nar_path("baz", ca.hash.digest, [ref]).absolute_path == NAR_SHA256_BAZ


@pytest.mark.parametrize("algo", [HashAlgo.SHA256, HashAlgo.SHA1, HashAlgo.MD5])
def test_flat_paths_recorded_from_nix(algo: HashAlgo) -> None:
    ca = CAHash(CAKind.FLAT, NixHash.of(algo, HELLO))
    assert build_ca_path("helloworld", ca).absolute_path == FLAT_HELLOWORLD_PATHS[algo]


def test_fingerprint_format_and_self_reference() -> None:
    digest = bytes(range(32))
    refs = [StorePath.parse(TEXT_FOO), StorePath.parse(NAR_SHA256_BAZ_REF), StorePath.parse(TEXT_BAZ)]
    ordered = sorted(p.absolute_path for p in refs)

    def expected(path_type: str, inner: bytes, name: str) -> str:
        fingerprint = f"{path_type}:sha256:{inner.hex()}:/nix/store:{name}"
        full = hashlib.sha256(fingerprint.encode()).digest()
        folded = bytearray(20)
        for i, b in enumerate(full):
            folded[i % 20] ^= b
        return f"/nix/store/{nixbase32.encode(bytes(folded))}-{name}"

    src = CAHash.nar(HashAlgo.SHA256, digest)
    source_type = "source:" + ":".join(ordered)
    assert build_ca_path("x", src, refs).absolute_path == expected(source_type, digest, "x")
    assert build_ca_path("x", src, reversed(refs)).absolute_path == expected(source_type, digest, "x")
    assert build_ca_path("x", src, refs, self_reference=True).absolute_path == expected(
        source_type + ":self", digest, "x"
    )
    assert build_ca_path("x", src, (), self_reference=True).absolute_path == expected("source:self", digest, "x")
    text = CAHash.text(digest)
    assert build_ca_path("y", text, refs[::-1]).absolute_path == expected("text:" + ":".join(ordered), digest, "y")
    flat = CAHash.flat(HashAlgo.SHA512, bytes(64))
    inner = hashlib.sha256(f"fixed:out:sha512:{'00' * 64}:".encode()).digest()
    assert build_ca_path("z", flat).absolute_path == expected("output:out", inner, "z")
    nar1 = CAHash.nar(HashAlgo.SHA1, bytes(20))
    inner = hashlib.sha256(f"fixed:out:r:sha1:{'00' * 20}:".encode()).digest()
    assert build_ca_path("z", nar1).absolute_path == expected("output:out", inner, "z")
    assert make_store_path("output:out", inner, "z") == build_ca_path("z", nar1)


def test_build_ca_path_errors() -> None:
    ref = StorePath.parse(TEXT_FOO)
    with pytest.raises(StorePathError, match="cannot refer to itself"):
        build_ca_path("t", CAHash.text(bytes(32)), self_reference=True)
    for ca in (
        CAHash.flat(HashAlgo.SHA256, bytes(32)),
        CAHash.flat(HashAlgo.SHA1, bytes(20)),
        CAHash.nar(HashAlgo.SHA1, bytes(20)),
        CAHash.nar(HashAlgo.SHA512, bytes(64)),
        CAHash.nar(HashAlgo.MD5, bytes(16)),
    ):
        with pytest.raises(StorePathError, match="cannot have references"):
            build_ca_path("f", ca, [ref])
        with pytest.raises(StorePathError, match="cannot have references"):
            build_ca_path("f", ca, self_reference=True)
    with pytest.raises(StorePathError, match="not allowed"):
        build_nar_path("a b", bytes(32))
    with pytest.raises(StorePathError, match="must not be empty"):
        build_text_path("", b"")
    with pytest.raises(StorePathError, match="must be a StorePath"):
        build_text_path("t", b"", [TEXT_FOO])  # type: ignore[list-item]
    with pytest.raises(StorePathError, match="inner digest"):
        make_store_path("source", bytes(20), "x")
    with pytest.raises(NixbaseError):
        build_nar_path("x", bytes(31))


def test_compress_hash() -> None:
    data = bytes(range(32))
    expected = bytearray(range(20))
    for i in range(20, 32):
        expected[i - 20] ^= i
    assert compress_hash(data) == bytes(expected)
    assert compress_hash(data, 20) == bytes(expected)
    assert compress_hash(b"\x01\x02\x03\x04\x05", 2) == bytes([1 ^ 3 ^ 5, 2 ^ 4])
    assert compress_hash(b"", 4) == b"\0" * 4
    assert compress_hash(b"\xaa", 3) == b"\xaa\0\0"
    with pytest.raises(ValueError, match="positive"):
        compress_hash(b"x", 0)


def test_gitignore_basename() -> None:
    p = StorePath.from_basename("fli4bwscgna7lpm7v5xgnjxrxh0yc7ra-.gitignore")
    assert p.name == ".gitignore"
    assert p.basename == "fli4bwscgna7lpm7v5xgnjxrxh0yc7ra-.gitignore"
    assert p.absolute_path == "/nix/store/fli4bwscgna7lpm7v5xgnjxrxh0yc7ra-.gitignore"
    assert nixbase32.encode(p.digest) == "fli4bwscgna7lpm7v5xgnjxrxh0yc7ra"


def test_store_path_forms() -> None:
    p = StorePath.parse(TEXT_FOO)
    assert p.name == "foo"
    assert p.hash_part == "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0"
    assert p.digest == nixbase32.decode("vxjiwkjkn7x4079qvh1jkl5pn05j2aw0")
    assert str(p) == TEXT_FOO == p.absolute_path
    assert repr(p) == f"StorePath({TEXT_FOO!r})"
    assert p.basename == TEXT_FOO.removeprefix("/nix/store/")
    assert StorePath.parse(p.basename) == p
    assert StorePath.parse(TEXT_FOO.encode()) == p
    assert StorePath.from_absolute_path(TEXT_FOO) == p
    assert StorePath.from_absolute_path(TEXT_FOO.encode()) == p
    assert StorePath.from_basename(p.basename.encode()) == p
    assert StorePath(p.digest, "foo") == p
    assert StorePath(bytearray(p.digest), "foo") == p  # type: ignore[arg-type]
    assert STORE_DIR == "/nix/store"
    assert DIGEST_SIZE == 20


def test_store_path_round_trip_random() -> None:
    rng = _rng(42)
    for _ in range(500):
        digest = rng.randbytes(20)
        name = "".join(rng.choice(NAME_CHARS) for _ in range(rng.randint(1, MAX_NAME_LEN)))
        p = StorePath(digest, name)
        assert p.basename == f"{nixbase32.encode(digest)}-{name}"
        assert p.absolute_path == f"/nix/store/{p.basename}"
        for form in (p.basename, p.absolute_path, p.basename.encode(), p.absolute_path.encode()):
            q = StorePath.parse(form)
            assert q == p
            assert hash(q) == hash(p)
            assert q.digest == digest
            assert q.name == name


def test_store_path_ordering() -> None:
    rng = _rng(5)
    paths = [StorePath(rng.randbytes(20), rng.choice(["a", "b", "a-1", "A", ".x"])) for _ in range(300)]
    # Same digest with different names, too.
    paths += [StorePath(paths[0].digest, n) for n in ("zz", "a.b", "0")]
    by_path = sorted(paths)
    assert [p.basename for p in by_path] == sorted(p.basename for p in paths)
    assert [p.absolute_path for p in by_path] == sorted(p.absolute_path for p in paths)
    assert by_path == sorted(paths, key=lambda p: (p.digest[::-1], p.name))
    lo = StorePath(b"\xff" + b"\0" * 19, "z")  # nixbase32 puts the last byte first
    hi = StorePath(b"\0" * 19 + b"\x01", "a")
    assert lo < hi
    assert lo <= hi
    assert hi > lo
    assert hi >= lo
    assert not hi < lo
    assert lo.basename < hi.basename
    same = StorePath(lo.digest, "y")
    assert same < lo
    assert lo <= StorePath(lo.digest, "z")
    with pytest.raises(TypeError):
        _ = lo < "x"


def test_store_path_hashable() -> None:
    a = StorePath.parse(TEXT_FOO)
    b = StorePath.parse(TEXT_FOO.removeprefix("/nix/store/"))
    c = StorePath(a.digest, "foo2")
    assert a == b
    assert a != c
    assert {a, b, c} == {a, c}
    assert {a: 1}[b] == 1
    other: object = TEXT_FOO
    assert a != other


def test_store_path_constructor_errors() -> None:
    with pytest.raises(StorePathError, match="digest is 20 bytes, got 19"):
        StorePath(bytes(19), "x")
    with pytest.raises(StorePathError, match="digest is 20 bytes, got 32"):
        StorePath(bytes(32), "x")
    with pytest.raises(StorePathError, match="must be bytes"):
        StorePath("0" * 20, "x")  # type: ignore[arg-type]
    with pytest.raises(StorePathError, match="not allowed"):
        StorePath(bytes(20), "x y")
    with pytest.raises(StorePathError, match="must not be empty"):
        StorePath(bytes(20), "")


H = "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"nix/store/{H}-foo", "does not start with '/nix/store/'"),
        (f"/nix/stor/{H}-foo", "does not start with '/nix/store/'"),
        (f"/gnu/store/{H}-foo", "does not start with '/nix/store/'"),
        (f"/nix/store{H}-foo", "does not start with '/nix/store/'"),
        (f"//nix/store/{H}-foo", "does not start with '/nix/store/'"),
        ("/nix/store", "does not start with '/nix/store/'"),
        ("/nix/store/", "too short"),
        (f"/nix/store/{H}-foo/bin", "extra path components"),
        (f"/nix/store/{H}-foo/", "extra path components"),
        (f"/nix/store/{H}/foo", "extra path components"),
        (f"/nix/store//{H}-foo", "extra path components"),
        ("/nix/store/abc-foo", "too short"),
        (f"/nix/store/{H}-", "too short"),
        (f"/nix/store/{H}", "too short"),
        (f"/nix/store/{H}_foo", "expected '-' at position 32"),
        (f"/nix/store/{H}foo", "expected '-' at position 32"),
        (f"/nix/store/{H[:-1]}-foo", "expected '-' at position 32|bad hash part"),
        (f"/nix/store/{H[:-1]}e-foo", "bad hash part.*'e' at position 31"),
        (f"/nix/store/{H.upper()}-foo", "bad hash part"),
        (f"/nix/store/{'u' * 32}-foo", "bad hash part"),
        (f"/nix/store/{H}-foo bar", "character ' ' at position 3"),
        (f"/nix/store/{H}-caf\u00e9", "not allowed"),
        (f"/nix/store/{H}-{'x' * 212}", "212 bytes long"),
    ],
)
def test_absolute_path_errors(text: str, match: str) -> None:
    with pytest.raises(StorePathError, match=match):
        StorePath.from_absolute_path(text)
    with pytest.raises(StorePathError, match=match):
        StorePath.from_absolute_path(text.encode())
    if text.startswith("/"):
        with pytest.raises(StorePathError):
            StorePath.parse(text)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "too short"),
        (f"{H}-", "too short"),
        (f"{H[:-2]}-foo", "too short|bad hash part|expected '-'"),
        (f"{H}+foo", "expected '-' at position 32"),
        (f"{H[:-1]}t-foo", "bad hash part"),
        (f"{H}-a/b", "character '/' at position 1"),
        (f"{H}-{'x' * 212}", "212 bytes long"),
    ],
)
def test_basename_errors(text: str, match: str) -> None:
    with pytest.raises(StorePathError, match=match):
        StorePath.from_basename(text)
    with pytest.raises(StorePathError, match=match):
        StorePath.from_basename(text.encode())


def test_basename_longest_name() -> None:
    assert StorePath.from_basename(f"{H}-{'x' * 211}").name == "x" * 211
    assert StorePath.from_basename(f"{H}-x").name == "x"


def test_basename_bytes_non_ascii() -> None:
    with pytest.raises(StorePathError, match="byte 0xc3 at position 3"):
        StorePath.from_basename(f"{H}-caf".encode() + "\u00e9".encode())
    with pytest.raises(StorePathError, match="bad hash part"):
        StorePath.from_basename(b"\xff" * 32 + b"-foo")
    with pytest.raises(StorePathError, match="does not start with"):
        StorePath.from_absolute_path(b"\xff/nix/store/" + H.encode() + b"-foo")


def test_vectors_file_agrees() -> None:
    """The shared vector copy in tests/data holds the same facts as the literals above."""
    vectors = _load_vectors()
    for entry in vectors["nixbase32"]:
        assert nixbase32.encode(bytes.fromhex(entry["hex"])) == entry["nixbase32"]
        assert nixbase32.decode(entry["nixbase32"]) == bytes.fromhex(entry["hex"])
    for text in vectors["nixbase32_invalid"]:
        with pytest.raises(NixbaseError):
            nixbase32.decode(text)
    for basename in vectors["valid_store_path_basenames"]:
        assert StorePath.from_basename(basename).basename == basename
    nar_by_name = {n["name"]: n for n in vectors["nar"]}
    for name, nar in (("symlink", "NAR_SYMLINK"), ("helloworld", "NAR_HELLOWORLD"), ("complicated", "NAR_COMPLICATED")):
        entry = nar_by_name[nar]
        assert nixbase32.encode(bytes.fromhex(entry["sha256_hex"])) == entry["sha256_nixbase32"]
        path = build_nar_path(name, bytes.fromhex(entry["sha256_hex"]))
        assert path.absolute_path == vectors["ca_import_store_paths"][name]
    for entry in vectors["store_paths"]:
        refs = [StorePath.parse(r) for r in entry.get("references", [])]
        if entry["kind"] == "text":
            got = build_text_path(entry["name"], entry["content"].encode(), refs)
        elif entry["kind"] == "fixed recursive sha1":
            got = build_ca_path(entry["name"], CAHash.nar(HashAlgo.SHA1, bytes.fromhex(entry["hash_hex"])), refs)
        else:
            assert entry["kind"] == "nar sha256 (source)"
            got = build_nar_path(entry["name"], nixbase32.decode(entry["nar_sha256_nixbase32"]), refs)
        assert got.absolute_path == entry["path"]


# ============================================================== against Nix itself (if installed)


def _run(args: list[str], tmp_path: Path) -> str:
    return str(run_nix(args, tmp_path))


def _random_tree(root: Path, rng: random.Random, depth: int = 0) -> None:
    root.mkdir()
    for i in range(rng.randint(0, 4)):
        kind = rng.random()
        child = root / f"e{i}{rng.choice(['', '.txt', '-x', '_y'])}"
        if kind < 0.5 or depth >= 2:
            child.write_bytes(rng.randbytes(rng.randint(0, 200)))
            if rng.random() < 0.3:
                child.chmod(0o755)
        elif kind < 0.7:
            child.symlink_to(f"target-{rng.randint(0, 99)}")
        else:
            _random_tree(child, rng, depth + 1)


@needs_nix
def test_build_nar_path_matches_nix_store_add(tmp_path: Path) -> None:
    assert NIX_STORE is not None and NIX_HASH is not None
    store = tmp_path / "store"
    rng = _rng(2024)
    work = tmp_path / "work"
    work.mkdir()
    for i in range(8):
        name = f"item{i}-" + "".join(rng.choice(NAME_CHARS) for _ in range(rng.randint(1, 12)))
        path = work / name
        if i % 2 == 0:
            path.write_bytes(rng.randbytes(rng.randint(0, 300)))
        else:
            _random_tree(path, rng)
        nar_hash = _run([NIX_HASH, "--type", "sha256", "--base32", str(path)], tmp_path)
        added = _run([NIX_STORE, "--store", str(store), "--add", str(path)], tmp_path)
        assert build_nar_path(name, nixbase32.decode(nar_hash)).absolute_path == added
        ca = CAHash.parse(f"fixed:r:sha256:{nar_hash}")
        assert build_ca_path(name, ca).absolute_path == added


@needs_nix
@pytest.mark.parametrize("recursive", [False, True])
@pytest.mark.parametrize("algo", list(HashAlgo))
def test_fixed_paths_match_nix_store_add_fixed(tmp_path: Path, algo: HashAlgo, recursive: bool) -> None:
    assert NIX_STORE is not None and NIX_HASH is not None
    rng = _rng(f"{algo}{recursive}")
    store = tmp_path / "store"
    name = f"fixed-{algo}{'-r' if recursive else ''}.bin"
    path = tmp_path / name
    path.write_bytes(rng.randbytes(rng.randint(1, 500)))
    args = [NIX_STORE, "--store", str(store), "--add-fixed"]
    if recursive:
        args.append("--recursive")
        digest = bytes.fromhex(_run([NIX_HASH, "--type", str(algo), str(path)], tmp_path))
        ca = CAHash.nar(algo, digest)
    else:
        ca = CAHash(CAKind.FLAT, NixHash.of(algo, path.read_bytes()))
    added = _run([*args, str(algo), str(path)], tmp_path)
    assert build_ca_path(name, ca).absolute_path == added


@needs_nix
@pytest.mark.skipif(NIX_INSTANTIATE is None, reason="nix-instantiate not installed (Debian nix-bin)")
def test_text_paths_match_builtins_to_file(tmp_path: Path) -> None:
    assert NIX_INSTANTIATE is not None
    store = tmp_path / "store"
    expr = (
        'let a = builtins.toFile "a" "alpha"; b = builtins.toFile "b" "beta"; '
        'c = builtins.toFile "c" "${b} and ${a}"; in "${a} ${b} ${c}"'
    )
    out = json.loads(_run([NIX_INSTANTIATE, "--store", str(store), "--eval", "--expr", expr], tmp_path))
    a_text, b_text, c_text = out.split(" ")
    a = build_text_path("a", b"alpha")
    b = build_text_path("b", b"beta")
    assert a.absolute_path == a_text
    assert b.absolute_path == b_text
    c = build_text_path("c", f"{b_text} and {a_text}".encode(), [b, a])
    assert c.absolute_path == c_text


@needs_nix
def test_hash_forms_match_nix_hash(tmp_path: Path) -> None:
    assert NIX_HASH is not None
    rng = _rng(3)
    for algo in HashAlgo:
        h = NixHash(algo, rng.randbytes(algo.digest_size))
        assert _run([NIX_HASH, "--type", str(algo), "--to-base32", h.hex()], tmp_path) == h.nix32()
        assert _run([NIX_HASH, "--type", str(algo), "--to-base16", h.nix32()], tmp_path) == h.hex()
