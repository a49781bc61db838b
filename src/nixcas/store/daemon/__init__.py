"""The Nix worker protocol (what ``nix-daemon`` speaks) over the store.

* :mod:`~nixcas.store.daemon.protocol` — magic numbers, versions, op and stderr codes.
* :mod:`~nixcas.store.daemon.wire` — integers, padded strings, lists, framed NAR streams.
* :mod:`~nixcas.store.daemon.session` — one client connection: handshake, op loop, error frames.
* :mod:`~nixcas.store.daemon.ops` — one handler per operation over the store's services.
* :mod:`~nixcas.store.daemon.trust` — who may connect, who is trusted (``SO_PEERCRED``).
* :mod:`~nixcas.store.daemon.server` — the unix socket server and the ``--stdio`` session.

The protocol facts are described in ``docs/nix-worker-protocol.md``.
"""
