"""One handler per worker-protocol operation, over the store's services.

Each handler reads its operation's arguments, then works, then answers with
``STDERR_LAST`` and its result (see :mod:`~nixcas.store.daemon.session`).
Operations nixcas cannot serve end with an error frame; the ones whose
arguments are known are read first, so the session goes on.

* :mod:`.state` — what every session shares (:class:`DaemonState`);
* :mod:`.args` — argument parsing and the path-info answer;
* :mod:`.incoming` — checking, ingesting and registering added paths;
* :mod:`.queries`, :mod:`.adding`, :mod:`.roots`, :mod:`.maintenance` — the handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nixcas.store.daemon.ops.adding import add_multiple_to_store, add_signatures, add_to_store_nar, nar_from_path
from nixcas.store.daemon.ops.maintenance import (
    add_build_log,
    add_text_to_store,
    add_to_store,
    collect_garbage,
    find_roots,
    optimise_store,
    set_options,
    verify_store,
)
from nixcas.store.daemon.ops.queries import (
    build_paths,
    build_paths_with_results,
    empty_path_set,
    ensure_path,
    is_valid_path,
    query_all_valid_paths,
    query_derivation_output_map,
    query_deriver,
    query_missing,
    query_path_from_hash_part,
    query_path_info,
    query_realisation,
    query_referrers,
    query_substitutable_path_info,
    query_substitutable_path_infos,
    query_substitutable_paths,
    query_valid_paths,
)
from nixcas.store.daemon.ops.roots import add_indirect_root, add_perm_root, add_temp_root, sync_with_gc
from nixcas.store.daemon.ops.state import DaemonState
from nixcas.store.daemon.protocol import Op
from nixcas.store.daemon.session import Session

__all__ = ["HANDLERS", "DaemonState"]

Handler = Callable[[Session], Awaitable[None]]

HANDLERS: dict[int, Handler] = {
    Op.IS_VALID_PATH: is_valid_path,
    Op.QUERY_VALID_PATHS: query_valid_paths,
    Op.QUERY_PATH_INFO: query_path_info,
    Op.QUERY_PATH_FROM_HASH_PART: query_path_from_hash_part,
    Op.QUERY_REFERRERS: query_referrers,
    Op.QUERY_ALL_VALID_PATHS: query_all_valid_paths,
    Op.QUERY_DERIVER: query_deriver,
    Op.QUERY_VALID_DERIVERS: empty_path_set,
    Op.QUERY_DERIVATION_OUTPUTS: empty_path_set,
    Op.QUERY_DERIVATION_OUTPUT_MAP: query_derivation_output_map,
    Op.QUERY_REALISATION: query_realisation,
    Op.QUERY_SUBSTITUTABLE_PATHS: query_substitutable_paths,
    Op.QUERY_SUBSTITUTABLE_PATH_INFO: query_substitutable_path_info,
    Op.QUERY_SUBSTITUTABLE_PATH_INFOS: query_substitutable_path_infos,
    Op.QUERY_MISSING: query_missing,
    Op.ENSURE_PATH: ensure_path,
    Op.BUILD_PATHS: build_paths,
    Op.BUILD_PATHS_WITH_RESULTS: build_paths_with_results,
    Op.ADD_TO_STORE_NAR: add_to_store_nar,
    Op.ADD_MULTIPLE_TO_STORE: add_multiple_to_store,
    Op.ADD_SIGNATURES: add_signatures,
    Op.NAR_FROM_PATH: nar_from_path,
    Op.ADD_TEMP_ROOT: add_temp_root,
    Op.ADD_INDIRECT_ROOT: add_indirect_root,
    Op.ADD_PERM_ROOT: add_perm_root,
    Op.SYNC_WITH_GC: sync_with_gc,
    Op.SET_OPTIONS: set_options,
    Op.OPTIMISE_STORE: optimise_store,
    Op.VERIFY_STORE: verify_store,
    Op.ADD_TO_STORE: add_to_store,
    Op.ADD_BUILD_LOG: add_build_log,
    Op.ADD_TEXT_TO_STORE: add_text_to_store,
    Op.FIND_ROOTS: find_roots,
    Op.COLLECT_GARBAGE: collect_garbage,
}
"""Every operation served (or refused after reading its arguments); any other ends the session."""
