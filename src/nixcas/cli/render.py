"""What the read-only commands print, without click: the full command line and its fast path print the same lines.

``castore ls`` (a listing line, or ``--json``), ``path-info`` (the text form, or ``--json``).
"""

from __future__ import annotations

import os

from nixcas.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode

TYPE_CHECKING = False  # not typing's: `castore ls` and `path-info` load nothing else of it
if TYPE_CHECKING:
    from typing import Any

    from nixcas.store.pathinfo.model import PathInfo

__all__ = ["ls_line", "node_json", "node_line", "path_info_lines", "show_bytes"]


def show_bytes(raw: bytes) -> str:
    """Names and targets for display and JSON (undecodable bytes kept via surrogateescape)."""
    return os.fsdecode(raw)


def node_json(node: Node) -> dict[str, Any]:
    """The ``--json`` form of a node."""
    if isinstance(node, DirectoryNode):
        return {"type": "directory", "digest": node.digest.hex(), "size": node.size}
    if isinstance(node, FileNode):
        return {"type": "file", "digest": node.digest.hex(), "size": node.size, "executable": node.executable}
    return {"type": "symlink", "target": show_bytes(node.target)}


def node_line(node: Node) -> str:
    """A one-line human form of a node."""
    if isinstance(node, DirectoryNode):
        return f"directory {node.digest.hex()} size={node.size}"
    if isinstance(node, FileNode):
        return f"file {node.digest.hex()} size={node.size}" + (" executable" if node.executable else "")
    return f"symlink -> {show_bytes(node.target)}"


def ls_line(name: bytes, node: Node, as_json: bool) -> str:
    """One entry of ``castore ls``: kind, digest, size and name (a symlink: its target), or a JSON object."""
    if as_json:
        import json

        return json.dumps({"name": show_bytes(name), **node_json(node)})
    if isinstance(node, SymlinkNode):
        return f"symlink {'-':>64} {'':>12} {show_bytes(name)} -> {show_bytes(node.target)}"
    kind = "dir" if isinstance(node, DirectoryNode) else "exe" if node.executable else "file"
    return f"{kind:<7} {node.digest.hex()} {node.size:>12} {show_bytes(name)}"


def path_info_lines(info: PathInfo, as_json: bool) -> list[str]:
    """What ``path-info`` prints of ``info``: ``Field: value`` lines, or one JSON object."""
    data = info.to_json()
    if as_json:
        import json

        return [json.dumps(data, indent=None)]
    lines = [
        f"StorePath: {data['path']}",
        f"NarHash: {info.nar_hash.to_nix32()}",
        f"NarSize: {info.nar_size}",
        "References:" + "".join(f" {r.basename}" for r in sorted(info.references)),
    ]
    if info.deriver is not None:
        lines.append(f"Deriver: {info.deriver.basename}.drv")
    lines.extend(f"Sig: {sig}" for sig in info.signatures)
    if info.ca is not None:
        lines.append(f"CA: {info.ca}")
    node: dict[str, Any] = data["rootNode"]  # type: ignore[assignment]
    lines.append("RootNode: " + " ".join(f"{k}={v}" for k, v in node.items()))
    return lines
