"""narinfo text, fingerprints, ed25519 keys and signatures (reference §6.7, §10.5), compressed NAR files."""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import json
import lzma
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard

from nixcas.errors import PathInfoError, ValidationError
from nixcas.store import nixbase32
from nixcas.store.compression import FileHashing, FileHashMismatch, UnsupportedCompression, decompressing
from nixcas.store.nar.parser import as_source
from nixcas.store.narinfo import NarInfo, fingerprint, parse_nar_file_name, parse_narinfo_name
from nixcas.store.pathinfo.model import Signature
from nixcas.store.signing import (
    SigningKey,
    SigningKeyError,
    VerifyingKey,
    has_valid_signature,
    parse_public_keys,
    path_info_fingerprint,
)
from nixcas.store.store_path import StorePath
from nixcas.testing.pathinfoservice import dummy_path_info

DATA = Path(__file__).parents[1] / "data"
V: dict[str, Any] = json.loads((DATA / "narinfo_vectors.json").read_text())
SIGS: dict[str, Any] = json.loads((DATA / "vectors.json").read_text())["signatures"]

CURL_NARINFO = """StorePath: /nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin
URL: nar/05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56.nar.xz
Compression: xz
FileHash: sha256:05ra3y72i3qjri7xskf9qj8kb29r6naqy1sqpbs3azi3xcigmj56
FileSize: 68852
NarHash: sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0
NarSize: 196040
References: 0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0 6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115 \
j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12 yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n
Deriver: 5rwxzi7pal3qhpsyfc16gzkh939q1np6-curl-7.82.0.drv
Sig: cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVWRdD1hkeKZBQ==
"""


def test_dummy_narinfo_renders_like_tvix() -> None:
    url = "nar/tvix-castore/CiISIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA?narsize=0"
    text = NarInfo.from_path_info(dummy_path_info(), url).render()
    assert text == V["dummy_narinfo_tvix"]
    assert NarInfo.parse(text).render() == text


def test_fingerprint_vectors() -> None:
    assert path_info_fingerprint(dummy_path_info()).decode() == V["dummy_fingerprint"]
    curl = NarInfo.parse(CURL_NARINFO)
    assert curl.fingerprint().decode() == SIGS["real_world"]["fingerprint"]


def test_real_world_narinfo_round_trip_and_signature() -> None:
    info = NarInfo.parse(CURL_NARINFO)
    assert info.render() == CURL_NARINFO
    assert info.compression == "xz"
    assert info.file_size == 68852
    assert info.deriver is not None and info.deriver.name == "curl-7.82.0"
    key = VerifyingKey.parse(SIGS["real_world"]["public_key"])
    assert has_valid_signature(info.fingerprint(), info.signatures, [key])
    assert str(info.signatures[0]) == SIGS["real_world"]["sig"]
    # one changed byte of the fingerprint, or another key name: invalid
    assert not has_valid_signature(info.fingerprint() + b"x", info.signatures, [key])
    assert not has_valid_signature(info.fingerprint(), info.signatures, [VerifyingKey("other-1", key.key)])


def test_signing_is_deterministic_and_matches_the_vectors() -> None:
    key = SigningKey.parse(V["secret_key"])
    assert str(key.public) == V["public_key"]
    assert str(key) == V["secret_key"]
    sig = key.sign(V["dummy_fingerprint"].encode())
    assert str(sig) == V["dummy_signature"]
    signed = key.sign_path_info(dummy_path_info())
    assert [str(s) for s in signed.signatures] == [V["dummy_signature"]]
    assert key.sign_path_info(signed) == signed  # not appended twice
    other = VerifyingKey.parse(V["do_not_use_public_key"])
    assert other.verify(V["dummy_fingerprint"].encode(), Signature.parse(V["do_not_use_dummy_signature"]))
    assert "cCta2" not in repr(key)


def test_generated_keys_sign_and_verify(tmp_path: Path) -> None:
    key = SigningKey.generate("test.example-1")
    path = tmp_path / "secret"
    path.write_text(str(key) + "\n")
    loaded = SigningKey.load(path)
    assert loaded == key
    msg = b"1;/nix/store/x;sha256:y;1;"
    assert loaded.public.verify(msg, key.sign(msg))
    assert parse_public_keys(f"{key.public}  {VerifyingKey.parse(V['public_key'])}")[0] == key.public


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("noname", "expected <name>:<base64>"),
        ("bad name:AAAA", "expected <name>:<base64>"),
        ("k:not base64!", "bad base64"),
        ("k:" + base64.b64encode(bytes(63)).decode(), "63 bytes"),
        (V["secret_key"][:-8] + "AAAAAA==", "does not belong"),
    ],
)
def test_bad_secret_keys(text: str, words: str) -> None:
    with pytest.raises(SigningKeyError, match=words):
        SigningKey.parse(text)


def test_bad_key_file(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="cannot read secret key"):
        SigningKey.load(tmp_path / "missing")
    (tmp_path / "k").write_text("k:" + base64.b64encode(bytes(32)).decode())
    with pytest.raises(SigningKeyError, match=f"{tmp_path / 'k'}: invalid secret key"):
        SigningKey.load(tmp_path / "k")
    with pytest.raises(SigningKeyError):
        VerifyingKey.parse("k:" + base64.b64encode(bytes(31)).decode())


def test_fingerprint_sorts_references() -> None:
    a, b = StorePath(b"\x01" * 20, "a"), StorePath(b"\x02" * 20, "b")
    first = fingerprint(a, bytes(32), 1, [a, b])
    assert first == fingerprint(a, bytes(32), 1, [b, a])
    assert first.decode().endswith(",".join(sorted([str(a), str(b)])))


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda t: t.replace("StorePath: /nix/store/", "StorePath: /tmp/"), "StorePath"),
        (lambda t: t.replace("NarHash: sha256:1b4", "NarHash: sha256:xyz"), "NarHash"),
        (lambda t: t.replace("NarSize: 196040", "NarSize: -5"), "NarSize"),
        (lambda t: t.replace("NarSize: 196040", "NarSize: 99999999999999999999999"), "NarSize"),
        (lambda t: t.replace("NarSize: 196040", "NarSize: \u00b2"), "NarSize"),  # isdigit() says yes, int() no
        (lambda t: t.replace("URL: ", "URL:"), "not 'Key: value'"),
        (lambda t: t.replace("URL: ", "URL "), "not 'Key: value'"),
        (lambda t: t + "NarSize: 1\n", "given twice"),
        (lambda t: t.replace("StorePath", "Nothing"), "missing StorePath"),
        (lambda t: t.replace("Sig: cache.nixos.org-1:", "Sig: cache.nixos.org-1:!"), "Sig"),
        (lambda t: t.replace("References: 0jqd", "References: 0eqd"), "References"),
        (lambda t: t.replace("curl-7.82.0.drv", "curl-7.82.0"), "Deriver"),
        (lambda t: t + "CA: fixed:r:sha257:abc\n", "CA"),
        (lambda t: t.replace("Compression: xz", "Compression: "), "empty Compression"),
        (lambda t: t + "X" * (2 << 20), "larger than"),
    ],
)
def test_bad_narinfo(mutate: Any, words: str) -> None:
    with pytest.raises(PathInfoError, match=words):
        NarInfo.parse(mutate(CURL_NARINFO))


def test_narinfo_tolerates_unknown_fields_and_defaults() -> None:
    text = CURL_NARINFO.replace("Compression: xz\n", "").replace("Deriver: ", "Foo: bar\nDeriver: ")
    info = NarInfo.parse(text)
    assert info.compression is None and info.effective_compression == "bzip2"
    no_refs = NarInfo.parse("\n".join(line for line in CURL_NARINFO.splitlines() if "References" not in line))
    assert no_refs.references == ()
    nb32 = "sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0"
    hexed = NarInfo.parse(CURL_NARINFO.replace(nb32, "sha256:" + info.nar_sha256.hex()))
    assert hexed.nar_sha256 == info.nar_sha256
    deriver = "5rwxzi7pal3qhpsyfc16gzkh939q1np6-curl-7.82.0.drv"
    unknown = NarInfo.parse(CURL_NARINFO.replace(deriver, "unknown-deriver"))
    assert unknown.deriver is None


def test_file_names() -> None:
    digest = hashlib.sha256(b"x").digest()
    nb = nixbase32.encode(digest)
    assert parse_nar_file_name(f"{nb}.nar") == (digest, "none")
    assert parse_nar_file_name(f"{nb}.nar.xz") == (digest, "xz")
    assert parse_nar_file_name(f"{nb}.nar.zst") == (digest, "zstd")
    assert parse_nar_file_name(f"{nb}.nar.bz2") == (digest, "bzip2")
    with pytest.raises(UnsupportedCompression):
        parse_nar_file_name(f"{nb}.nar.lz4")
    for bad in [f"{nb[:-1]}.nar", f"{nb[:-1]}e.nar", f"{nb}.narx", f"{nb}", "", ".nar", f"{nb}.tar"]:
        with pytest.raises(PathInfoError):
            parse_nar_file_name(bad)
    assert parse_narinfo_name(f"{nb[:32]}.narinfo") == nixbase32.decode(nb[:32])
    for bad in [f"{nb[:31]}.narinfo", f"{nb[:31]}u.narinfo", f"{nb[:32]}.nar", f"{nb[:32]}.narinfo.x", "x"]:
        with pytest.raises(PathInfoError):
            parse_narinfo_name(bad)


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda b: b,
    "xz": lzma.compress,
    "bzip2": bz2.compress,
    "gzip": gzip.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
}


async def read_all(source: Any, n: int = 65536) -> bytes:
    out = []
    while data := await source.read(n):
        out.append(data)
        assert len(data) <= n
    return b"".join(out)


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
async def test_decompressing(compression: str) -> None:
    payload = hashlib.sha256(b"seed").digest() * 50_000 + bytes(3_000_000)
    packed = COMPRESSORS[compression](payload)
    raw = FileHashing(as_source(packed), expected_digest=hashlib.sha256(packed).digest(), expected_size=len(packed))
    source = decompressing(raw, compression)
    try:
        assert await read_all(source) == payload
    finally:
        source.close()
    assert raw.eof and raw.size == len(packed)


@pytest.mark.parametrize("compression", ["xz", "zstd", "bzip2", "gzip"])
async def test_decompressing_checks_the_file_hash_and_rejects_garbage(compression: str) -> None:
    packed = COMPRESSORS[compression](b"hello world" * 1000)
    source = decompressing(FileHashing(as_source(packed), expected_digest=bytes(32)), compression)
    with pytest.raises(FileHashMismatch, match="hash mismatch"):
        await read_all(source)
    source.close()
    broken = decompressing(FileHashing(as_source(packed[: len(packed) // 2] + b"\x00garbage" * 10)), compression)
    with pytest.raises(ValidationError):
        await read_all(broken)
    broken.close()


async def test_unknown_compression() -> None:
    with pytest.raises(UnsupportedCompression, match="lz4"):
        decompressing(FileHashing(as_source(b"")), "lz4")
