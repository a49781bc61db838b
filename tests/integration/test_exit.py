"""A command whose object store is unreachable exits 1 with one line, every time (issue 16, defect 5).

Before, the obstore client's native threads were still alive while the interpreter finalized, and
about a third of the runs died by SIGABRT or SIGBUS after printing the right error line.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from nixcas.testing.daemon import clean_env, free_port, nixcas_command

RUNS_PER_COMMAND = 12
TIMEOUT = 180.0


def test_unreachable_s3_exits_1_cleanly_every_time(tmp_path: Path) -> None:
    port = free_port()  # nobody listens there: every request is refused
    url = (
        f"objectstore+s3://nixcas/x?endpoint=http://127.0.0.1:{port}&region=us-east-1"
        "&access_key_id=a&secret_access_key=b&max_retries=1&retry_timeout=2"
    )
    commands = {
        "daemon": ["daemon", "--listen-address", "127.0.0.1:0"],
        "cat": ["castore", "cat", "0" * 64],
    }
    procs = []
    for name, args in commands.items():
        for i in range(RUNS_PER_COMMAND):
            store = tmp_path / f"{name}{i}"
            cmd = nixcas_command("--store-dir", str(store), "--blob-service-addr", url, *args)
            procs.append(
                (f"{name} #{i}", subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env()))
            )
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for what, proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((what, proc.returncode, out, err))
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for what, code, out, err in results:
        assert code == 1, f"{what}: exit {code}, stderr {err!r}"
        lines = err.decode(errors="replace").splitlines()
        assert len(lines) == 1 and lines[0].startswith("nixcas: error: "), f"{what}: {err!r}"
        assert "unreachable" in lines[0], lines[0]
        assert out == b""


def test_a_success_with_a_native_runtime_loaded_skips_finalization() -> None:
    """`gc` against S3 + PostgreSQL died by SIGABRT after its report about once in 40 runs.

    Once a module with native threads is loaded, a successful command leaves like a failing one:
    stdout flushed (nothing lost), interpreter finalization (atexit, thread teardown) skipped.
    """
    program = (
        "import atexit, sys, grpc\n"
        "from nixcas.cli.common import exit_process\n"
        "atexit.register(lambda: sys.stderr.write('finalized'))\n"
        "sys.stdout.write('report' * 10000)\n"
        "exit_process(0)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, env=clean_env(), check=False)
    assert result.returncode == 0
    assert result.stdout == b"report" * 10000
    assert result.stderr == b""


def test_a_success_without_native_runtimes_exits_normally() -> None:
    program = (
        "import atexit, sys\n"
        "from nixcas.cli.common import exit_process\n"
        "atexit.register(lambda: sys.stderr.write('finalized'))\n"
        "exit_process(None)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, env=clean_env(), check=False)
    assert (result.returncode, result.stderr) == (0, b"finalized")
