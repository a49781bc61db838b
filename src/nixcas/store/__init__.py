"""The Nix layer: nixbase32, store paths, NAR, PathInfo — everything that knows about Nix.

The castore below knows nothing of Nix; this package turns castore trees into
store paths (``/nix/store/<hash>-<name>``), NAR archives and PathInfo records.
"""
