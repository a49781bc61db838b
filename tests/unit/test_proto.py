"""The committed generated code is exactly what `make proto` produces, and matches the wire contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import Descriptor, FileDescriptor

from nixcas._proto.snix.castore.protos import blobstore_pb2 as snix_blobstore_pb2
from nixcas._proto.snix.castore.protos import castore_pb2 as snix_castore_pb2
from nixcas._proto.snix.castore.protos import rpc_blobservice_pb2 as snix_rpc_blobservice_pb2
from nixcas._proto.snix.castore.protos import rpc_blobstore_pb2 as snix_rpc_blobstore_pb2
from nixcas._proto.snix.castore.protos import rpc_chunkstore_pb2 as snix_rpc_chunkstore_pb2
from nixcas._proto.snix.castore.protos import rpc_directory_pb2 as snix_rpc_directory_pb2
from nixcas._proto.snix.store.protos import pathinfo_pb2 as snix_pathinfo_pb2
from nixcas._proto.snix.store.protos import rpc_pathinfo_pb2 as snix_rpc_pathinfo_pb2
from nixcas._proto.tvix.castore.protos import castore_pb2, rpc_blobstore_pb2, rpc_directory_pb2
from nixcas._proto.tvix.store.protos import pathinfo_pb2, rpc_pathinfo_pb2

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "src" / "nixcas" / "_proto"


def _tree(base: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(base)): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_regeneration_is_a_no_op(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "genproto.py"), str(out)], check=True, capture_output=True)
    fresh, committed = _tree(out), _tree(COMMITTED)
    assert sorted(fresh) == sorted(committed)
    changed = [name for name in fresh if fresh[name] != committed[name]]
    assert changed == [], f"run `make proto`: generated code differs in {changed}"


def test_descriptor_names_match_the_wire_contract() -> None:
    assert castore_pb2.DESCRIPTOR.name == "tvix/castore/protos/castore.proto"
    assert castore_pb2.DESCRIPTOR.package == "tvix.castore.v1"
    assert rpc_directory_pb2.DESCRIPTOR.dependencies[0].name == "tvix/castore/protos/castore.proto"
    assert pathinfo_pb2.DESCRIPTOR.package == "tvix.store.v1"
    services = {
        s.full_name: sorted(m.name for m in s.methods)
        for mod in (rpc_blobstore_pb2, rpc_directory_pb2, rpc_pathinfo_pb2)
        for s in mod.DESCRIPTOR.services_by_name.values()
    }
    assert services == {
        "tvix.castore.v1.BlobService": ["Put", "Read", "Stat"],
        "tvix.castore.v1.DirectoryService": ["Get", "Put"],
        "tvix.store.v1.PathInfoService": ["CalculateNAR", "Get", "List", "Put"],
    }


def test_field_numbers() -> None:
    def fields(msg: object) -> dict[str, int]:
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert fields(castore_pb2.Directory) == {"directories": 1, "files": 2, "symlinks": 3}
    assert fields(castore_pb2.FileNode) == {"name": 1, "digest": 2, "size": 3, "executable": 4}
    assert fields(castore_pb2.Node) == {"directory": 1, "file": 2, "symlink": 3}
    assert fields(rpc_blobstore_pb2.StatBlobRequest) == {"digest": 1, "send_chunks": 2, "send_bao": 3}
    assert fields(rpc_blobstore_pb2.StatBlobResponse) == {"chunks": 2, "bao": 3}
    assert fields(rpc_directory_pb2.GetDirectoryRequest) == {"digest": 1, "recursive": 2}
    assert fields(pathinfo_pb2.NARInfo) == {
        "nar_size": 1,
        "nar_sha256": 2,
        "signatures": 3,
        "reference_names": 4,
        "deriver": 5,
        "ca": 6,
    }
    assert pathinfo_pb2.NARInfo.CA.Hash.Value("FLAT_SHA512") == 8
    assert fields(rpc_pathinfo_pb2.CalculateNARResponse) == {"nar_size": 1, "nar_sha256": 2}


def _wire_shape(file: FileDescriptor) -> dict[str, object]:
    """Every message's fields (number, type, label) and every method's streaming shape, names excluded."""

    def message(m: Descriptor) -> object:
        nested = sorted((message(n) for n in m.nested_types), key=repr)
        return sorted((f.number, f.type, f.is_repeated) for f in m.fields), nested

    return {
        "messages": sorted((message(m) for m in file.message_types_by_name.values()), key=repr),
        "methods": sorted(
            (
                s.name,
                m.name,
                m.client_streaming,
                m.server_streaming,
                m.input_type.fields[0].number if m.input_type.fields else 0,
            )
            for s in file.services_by_name.values()
            for m in s.methods
        ),
    }


def test_snix_protos_are_the_tvix_wire_format_under_snix_names() -> None:
    pairs = [
        (castore_pb2, snix_castore_pb2),
        (rpc_blobstore_pb2, snix_rpc_blobservice_pb2),
        (rpc_directory_pb2, snix_rpc_directory_pb2),
        (pathinfo_pb2, snix_pathinfo_pb2),
        (rpc_pathinfo_pb2, snix_rpc_pathinfo_pb2),
    ]
    for tvix, snix in pairs:
        # snix moved BlobService to rpc_blobservice.proto (rpc_blobstore.proto is BlobStoreService there)
        expected = tvix.DESCRIPTOR.name.replace("tvix/", "snix/", 1).replace("rpc_blobstore", "rpc_blobservice")
        assert snix.DESCRIPTOR.name == expected
        assert snix.DESCRIPTOR.package == tvix.DESCRIPTOR.package.replace("tvix.", "snix.", 1)
        assert _wire_shape(snix.DESCRIPTOR) == _wire_shape(tvix.DESCRIPTOR)
    # the renames of reference §11
    assert [f.name for f in snix_castore_pb2.Entry.DESCRIPTOR.oneofs] == ["entry"]
    files = snix_castore_pb2.Directory.DESCRIPTOR.fields_by_name["files"].message_type
    assert files is not None
    assert files.name == "FileEntry"
    assert snix_pathinfo_pb2.PathInfo.DESCRIPTOR.fields_by_name["entry"].number == 1
    method = snix_rpc_pathinfo_pb2.DESCRIPTOR.services_by_name["PathInfoService"].methods_by_name["CalculateNAR"]
    assert method.input_type.full_name == "snix.castore.v1.Entry"


def test_snix_chunkstore_and_blobstore_contract() -> None:
    """snix-2026 ChunkStoreService / BlobStoreService: files, methods, streaming shapes, field numbers."""

    def fields(msg: object) -> dict[str, int]:
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}  # type: ignore[attr-defined]

    assert snix_rpc_chunkstore_pb2.DESCRIPTOR.name == "snix/castore/protos/rpc_chunkstore.proto"
    assert snix_rpc_blobstore_pb2.DESCRIPTOR.name == "snix/castore/protos/rpc_blobstore.proto"
    assert snix_blobstore_pb2.DESCRIPTOR.name == "snix/castore/protos/blobstore.proto"
    assert [d.name for d in snix_rpc_blobstore_pb2.DESCRIPTOR.dependencies] == ["snix/castore/protos/blobstore.proto"]
    for module in (snix_rpc_chunkstore_pb2, snix_rpc_blobstore_pb2, snix_blobstore_pb2):
        assert module.DESCRIPTOR.package == "snix.castore.v1"
    shapes = {
        f"{s.name}.{m.name}": (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for module in (snix_rpc_chunkstore_pb2, snix_rpc_blobstore_pb2)
        for s in module.DESCRIPTOR.services_by_name.values()
        for m in s.methods
    }
    assert shapes == {
        "ChunkStoreService.StatChunk": ("StatChunkRequest", "StatChunkResponse", False, False),
        "ChunkStoreService.GetChunk": ("GetChunkRequest", "GetChunkResponse", False, True),
        "ChunkStoreService.PutChunk": ("PutChunkRequest", "PutChunkResponse", True, False),
        "BlobStoreService.StatBlob": ("BSStatBlobRequest", "BSStatBlobResponse", False, False),
        "BlobStoreService.GetBlob": ("GetBlobRequest", "GetBlobResponse", False, False),
        "BlobStoreService.PutBlob": ("PutBlobRequest", "BSPutBlobResponse", False, False),
    }
    cs, bs, meta = snix_rpc_chunkstore_pb2, snix_rpc_blobstore_pb2, snix_blobstore_pb2
    assert fields(cs.StatChunkRequest) == {"digest": 1} and fields(cs.StatChunkResponse) == {}
    assert fields(cs.GetChunkRequest) == {"digest": 1} and fields(cs.GetChunkResponse) == {"data": 1}
    assert fields(cs.PutChunkRequest) == {"data": 1} and fields(cs.PutChunkResponse) == {"digest": 1}
    assert fields(bs.BSStatBlobRequest) == {"digest": 1} and fields(bs.BSStatBlobResponse) == {}
    assert fields(bs.GetBlobRequest) == {"digest": 1} and fields(bs.GetBlobResponse) == {"blob_meta": 1}
    assert fields(bs.PutBlobRequest) == {"digest": 1, "blob_meta": 2} and fields(bs.BSPutBlobResponse) == {}
    assert fields(meta.BlobMeta) == {"chunks": 2}
    assert fields(meta.BlobMeta.ChunkMeta) == {"digest": 1, "size": 2}
    assert meta.BlobMeta.ChunkMeta.DESCRIPTOR.full_name == "snix.castore.v1.BlobMeta.ChunkMeta"
    # the old BlobService stays where tvix has it, and keeps its three methods under snix too
    assert [s for s in snix_rpc_blobservice_pb2.DESCRIPTOR.services_by_name] == ["BlobService"]
    assert "BlobService" not in snix_rpc_blobstore_pb2.DESCRIPTOR.services_by_name


def test_same_bytes_under_both_names() -> None:
    """A PathInfo built with the 2024 names and with the 2026 names serializes to the same bytes."""
    digest, ref = bytes(range(32)), bytes(range(20))
    narinfo = dict(nar_size=1234, nar_sha256=bytes(32), reference_names=["x-dep"])
    old = pathinfo_pb2.PathInfo(
        node=castore_pb2.Node(file=castore_pb2.FileNode(name=b"x-name", digest=digest, size=5, executable=True)),
        references=[ref],
        narinfo=pathinfo_pb2.NARInfo(**narinfo),  # type: ignore[arg-type]
    )
    new = snix_pathinfo_pb2.PathInfo(
        entry=snix_castore_pb2.Entry(
            file=snix_castore_pb2.FileEntry(name=b"x-name", digest=digest, size=5, executable=True)
        ),
        references=[ref],
        narinfo=snix_pathinfo_pb2.NARInfo(**narinfo),  # type: ignore[arg-type]
    )
    raw = old.SerializeToString(deterministic=True)
    assert raw == new.SerializeToString(deterministic=True)
    # hand-written bytes of the node: field 1 (entry/node) → field 2 (file) → name, digest, size, executable
    file_entry = b"\x0a\x06x-name" + b"\x12\x20" + digest + b"\x18\x05" + b"\x20\x01"
    assert raw.startswith(b"\x0a" + bytes([len(file_entry) + 2]) + b"\x12" + bytes([len(file_entry)]) + file_entry)
    assert snix_pathinfo_pb2.PathInfo.FromString(raw) == new
    assert pathinfo_pb2.PathInfo.FromString(new.SerializeToString()) == old
    directory = snix_castore_pb2.Directory(
        directories=[snix_castore_pb2.DirectoryEntry(name=b"d", digest=digest, size=2)],
        symlinks=[snix_castore_pb2.SymlinkEntry(name=b"l", target=b"t")],
    )
    tvix_directory = castore_pb2.Directory(
        directories=[castore_pb2.DirectoryNode(name=b"d", digest=digest, size=2)],
        symlinks=[castore_pb2.SymlinkNode(name=b"l", target=b"t")],
    )
    assert directory.SerializeToString(deterministic=True) == tvix_directory.SerializeToString(deterministic=True)
    assert pathinfo_pb2.PathInfo.DESCRIPTOR.fields_by_name["node"].number == 1
    assert snix_pathinfo_pb2.PathInfo.DESCRIPTOR.fields_by_name["entry"].number == 1
