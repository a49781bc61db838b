"""The Nix layer over gRPC: the PathInfoService servicer (``tvix.store.v1`` / ``snix.store.v1``)."""
