"""The committed generated code is exactly what `make proto` produces, and matches the wire contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import Descriptor, FileDescriptor

from nixcas._proto.snix.castore.protos import castore_pb2 as snix_castore_pb2
from nixcas._proto.snix.castore.protos import rpc_blobstore_pb2 as snix_rpc_blobstore_pb2
from nixcas._proto.snix.castore.protos import rpc_directory_pb2 as snix_rpc_directory_pb2
from nixcas._proto.snix.store.protos import pathinfo_pb2 as snix_pathinfo_pb2
from nixcas._proto.snix.store.protos import rpc_pathinfo_pb2 as snix_rpc_pathinfo_pb2
from nixcas._proto.tvix.castore.protos import castore_pb2, rpc_blobstore_pb2, rpc_directory_pb2
from nixcas._proto.tvix.store.protos import pathinfo_pb2, rpc_pathinfo_pb2

ROOT = Path(__file__).resolve().parent.parent
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
        (rpc_blobstore_pb2, snix_rpc_blobstore_pb2),
        (rpc_directory_pb2, snix_rpc_directory_pb2),
        (pathinfo_pb2, snix_pathinfo_pb2),
        (rpc_pathinfo_pb2, snix_rpc_pathinfo_pb2),
    ]
    for tvix, snix in pairs:
        assert snix.DESCRIPTOR.name == tvix.DESCRIPTOR.name.replace("tvix/", "snix/", 1)
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
