"""A throw-away single-node Ceph RADOS Gateway (the S3 API) on 127.0.0.1, for the tests.

One monitor, one memstore OSD (objects in RAM) and radosgw's beast frontend, from Debian's
packages (Ceph 16.2 on Debian 12), started as root.  Derived from the setup in
``../shared/ceph-s3``; this file is the project's own.

    python tests/rgw.py start     # installs the packages if missing, prints AWS_* exports
    python tests/rgw.py stop      # stops the daemons by their pid files, deletes the data

The tests use :func:`start` / :meth:`Rgw.stop` through the ``s3_server`` fixture
(``tests/conftest.py``).  Ports are free ones picked at start (so a developer's own
instance on the usual ports is never touched) unless ``CASTORE_RGW_PORT`` /
``CASTORE_RGW_MON_PORT`` say otherwise.  Every wait polls a readiness check up to a
deadline (``CASTORE_RGW_TIMEOUT``, 90 s); a start that fails stops what it started and
raises :class:`RgwError` with the daemons' log tails.

A data directory holds ``owner.pid`` when a process (pytest) owns the instance: the next
:func:`start` stops instances whose owner has died (a test run killed before its teardown),
so they do not hold RAM forever.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("radosgw", "ceph-mon", "ceph-osd")
#: the programs the setup runs (ceph and radosgw-admin come with the packages above)
PROGRAMS = ("radosgw", "radosgw-admin", "ceph-mon", "ceph-osd", "ceph", "monmaptool")
TOP = Path(tempfile.gettempdir())
DIR_PREFIX = "castore-rgw-"
#: where ``python tests/rgw.py start`` records the instance it started (for ``stop``)
STATE_FILE = TOP / "castore-rgw.current"
DAEMONS = ("radosgw", "ceph-osd", "ceph-mon")
REGION = "us-east-1"


class RgwError(RuntimeError):
    """The gateway could not be installed or started; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Rgw:
    """A running gateway: where it listens, its S3 user, and where its data and pids are."""

    #: ``http://127.0.0.1:PORT``
    endpoint: str
    access_key: str
    secret_key: str
    #: the data directory (config, pid files, logs, monitor store); deleted by :meth:`stop`
    path: Path
    region: str = REGION

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this gateway."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
        }

    def stop(self) -> None:
        """Stop every daemon and delete the data directory (idempotent)."""
        stop(self.path)

    def stop_gateway(self) -> None:
        """Stop only radosgw (the monitor and OSD keep the data): S3 requests are refused."""
        _kill(self.path / "run" / "client.rgw.pid")

    def start_gateway(self, timeout: float | None = None) -> None:
        """Start radosgw again after :meth:`stop_gateway`; returns once it answers HTTP."""
        deadline = time.monotonic() + (timeout or _timeout())
        _run(["radosgw", "-n", "client.rgw"], self.path, deadline, "radosgw did not start")
        _wait(lambda: _http_ok(self.endpoint), deadline, "radosgw answering HTTP", self.path)


def _timeout() -> float:
    return float(os.environ.get("CASTORE_RGW_TIMEOUT", "90"))


def install(*, quiet: bool = False) -> float:
    """Install the Debian packages if a program is missing; the seconds it took (0 if none).

    Runs ``apt-get install`` (then ``apt-get update`` and again, if the package lists are
    stale); as a non-root user, raises :class:`RgwError` saying what to run.
    """
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if not missing:
        return 0.0
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if os.geteuid() != 0:
        raise RgwError(
            f"the S3 tests need Ceph's RADOS Gateway ({', '.join(missing)} not found); "
            f"install it as root: {' '.join(command)}   (or run `make s3-deps` as root)"
        )
    t0 = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = None if not quiet else subprocess.DEVNULL
    if subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
        if subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            raise RgwError(f"could not install the gateway: {' '.join(command)} failed")
    still = [p for p in PROGRAMS if shutil.which(p) is None]
    if still:
        raise RgwError(f"installed {' '.join(PACKAGES)} but {', '.join(still)} still not found")
    return time.monotonic() - t0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2) as reply:
            return reply.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _config(path: Path, fsid: str, port: int, mon_port: int) -> str:
    memstore = os.environ.get("CASTORE_RGW_MEMSTORE_BYTES", str(4 << 30))
    return f"""[global]
fsid = {fsid}
mon_host = v1:127.0.0.1:{mon_port}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr2 = false
ms_bind_ipv6 = false
# a test cluster: no cephx between the daemons (RGW still checks every S3 request's signature)
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
osd_pool_default_pg_autoscale_mode = off
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
mon_max_pg_per_osd = 1000
# faster paxos commits: with one monitor, start-up is map updates
paxos_propose_interval = 0.05
paxos_min_wait = 0.01
mon_data_avail_warn = 1
mon_data_avail_crit = 0
run_dir = {path}/run
admin_socket = {path}/run/$name.asok
log_file = {path}/log/$name.log
pid_file = {path}/run/$name.pid
crash_dir = {path}/crash
[mon.a]
mon_data = {path}/mon.a
[osd]
osd_data = {path}/osd.$id
osd_objectstore = memstore
memstore_device_bytes = {memstore}
osd_memory_target = 1073741824
# with auth=none the OSD's own crush/device-class update fails ("wrong fsid"): done by hand
osd_class_update_on_start = false
osd_crush_update_on_start = false
[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:{port}
rgw_thread_pool_size = 64
rgw_data = {path}/rgw
"""


def _env(path: Path) -> dict[str, str]:
    return {**os.environ, "CEPH_CONF": str(path / "ceph.conf")}


#: what the ceph CLI says when the monitor did not answer it yet (seen on a loaded machine right
#: after the quorum formed): the command was never sent, so running it again is safe
_NOT_SENT = ("problem getting command descriptions",)


def _run(command: list[str], path: Path, deadline: float, what: str) -> str:
    """Run a ceph command to completion within the deadline; its stdout, or fail with logs.

    A command the monitor did not take yet (``_NOT_SENT``) is run again until the deadline."""
    delay = 0.1
    while True:
        left = max(1.0, deadline - time.monotonic())
        try:
            done = subprocess.run(command, env=_env(path), capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            raise _failure(f"{what}: `{' '.join(command)}` did not finish in {left:.0f} s", path) from None
        if done.returncode == 0:
            return done.stdout
        if any(text in done.stderr for text in _NOT_SENT) and time.monotonic() + delay < deadline:
            time.sleep(delay)  # bounded by the deadline; the monitor is still settling
            delay = min(delay * 2, 2.0)
            continue
        raise _failure(f"{what}: `{' '.join(command)}` exited {done.returncode}: {done.stderr.strip()[-800:]}", path)


def _wait(ready, deadline: float, what: str, path: Path) -> None:
    """Poll ``ready()`` until true; past the deadline, fail with the logs."""
    delay = 0.05
    while not ready():
        if time.monotonic() > deadline:
            raise _failure(f"timed out waiting for {what}", path)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _failure(message: str, path: Path) -> RgwError:
    tails = []
    for log in sorted((path / "log").glob("*")):
        with contextlib.suppress(OSError):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            tails.append(f"--- {log.name} (last {len(lines)} lines)\n" + "\n".join(lines))
    return RgwError(f"the RADOS Gateway in {path} did not come up: {message}\n" + "\n".join(tails))


def _osds_up(path: Path, deadline: float) -> bool:
    try:
        out = subprocess.run(
            ["ceph", "--connect-timeout", "2", "osd", "dump", "-f", "json"],
            env=_env(path),
            capture_output=True,
            text=True,
            timeout=max(1.0, min(10.0, deadline - time.monotonic())),
        )
    except subprocess.TimeoutExpired:
        return False
    if out.returncode != 0:
        return False
    osds = json.loads(out.stdout).get("osds", [])
    return bool(osds) and all(o.get("up") for o in osds)


def _quorum(path: Path, deadline: float) -> bool:
    try:
        return (
            subprocess.run(
                ["ceph", "--connect-timeout", "2", "quorum_status"],
                env=_env(path),
                capture_output=True,
                timeout=max(1.0, min(10.0, deadline - time.monotonic())),
            ).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        return False


def reap_orphans() -> list[Path]:
    """Stop the instances whose owning process has died; the data directories removed."""
    reaped = []
    for path in TOP.glob(DIR_PREFIX + "*"):
        owner = path / "owner.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(owner.read_text())
            if not Path(f"/proc/{pid}").exists():
                stop(path)
                reaped.append(path)
    return reaped


def start(
    path: Path | None = None,
    *,
    port: int | None = None,
    mon_port: int | None = None,
    owner: int | None = None,
    timeout: float | None = None,
) -> Rgw:
    """Install if needed, start a fresh gateway and create its S3 user; returns it running.

    ``path`` (a new temporary directory by default) must not hold a running instance.
    ``owner``: a pid whose death lets a later :func:`start` reap this instance.
    Raises :class:`RgwError` (with the logs' tails) when anything fails or a step does not
    finish within ``timeout`` seconds; what was started is stopped first.
    """
    install()
    reap_orphans()
    port = port or int(os.environ.get("CASTORE_RGW_PORT", "0")) or free_port()
    mon_port = mon_port or int(os.environ.get("CASTORE_RGW_MON_PORT", "0")) or free_port()
    while mon_port == port:
        mon_port = free_port()
    for p in (port, mon_port):
        if _port_in_use(p):
            raise RgwError(f"port {p} on 127.0.0.1 is in use (set CASTORE_RGW_PORT / CASTORE_RGW_MON_PORT)")
    path = Path(path) if path else Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=TOP))
    for sub in ("run", "log", "mon.a", "osd.0"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    if owner is not None:
        (path / "owner.pid").write_text(str(owner))
    deadline = time.monotonic() + (timeout or _timeout())
    fsid = str(uuid.uuid4())
    (path / "ceph.conf").write_text(_config(path, fsid, port, mon_port))
    try:
        _run(
            ["monmaptool", "--create", "--addv", "a", f"v1:127.0.0.1:{mon_port}", "--fsid", fsid, str(path / "monmap")],
            path,
            deadline,
            "monmap",
        )
        _run(["ceph-mon", "--mkfs", "-i", "a", "--monmap", str(path / "monmap")], path, deadline, "ceph-mon --mkfs")
        _run(["ceph-mon", "-i", "a"], path, deadline, "ceph-mon did not start")
        _wait(lambda: _quorum(path, deadline), deadline, "the monitor's quorum", path)
        osd_uuid = str(uuid.uuid4())
        osd_id = _run(["ceph", "osd", "new", osd_uuid], path, deadline, "ceph osd new").strip()
        _run(["ceph", "osd", "crush", "add-bucket", "localhost", "host"], path, deadline, "crush add-bucket")
        _run(["ceph", "osd", "crush", "move", "localhost", "root=default"], path, deadline, "crush move")
        _run(["ceph", "osd", "crush", "add", f"osd.{osd_id}", "1.0", "host=localhost"], path, deadline, "crush add")
        _run(["ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid], path, deadline, "ceph-osd --mkfs")
        _run(["ceph-osd", "-i", osd_id], path, deadline, "ceph-osd did not start")
        _wait(lambda: _osds_up(path, deadline), deadline, "the OSD to be up", path)
        endpoint = f"http://127.0.0.1:{port}"
        _run(["radosgw", "-n", "client.rgw"], path, deadline, "radosgw did not start")
        _wait(lambda: _http_ok(endpoint), deadline, "radosgw answering HTTP", path)
        access_key = "CASTORE" + uuid.uuid4().hex[:13].upper()
        secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        _run(
            [
                "radosgw-admin",
                "user",
                "create",
                "--uid=castore",
                "--display-name=castore tests",
                f"--access-key={access_key}",
                f"--secret-key={secret_key}",
            ],
            path,
            deadline,
            "radosgw-admin user create",
        )
    except BaseException:
        stop(path)
        raise
    rgw = Rgw(endpoint=endpoint, access_key=access_key, secret_key=secret_key, path=path)
    (path / "rgw.json").write_text(
        json.dumps({"endpoint": endpoint, "access_key": access_key, "secret_key": secret_key})
    )
    return rgw


def running(path: Path) -> Rgw | None:
    """The instance recorded in ``path`` if its gateway answers, else None."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        info = json.loads((path / "rgw.json").read_text())
        if _http_ok(info["endpoint"]):
            return Rgw(info["endpoint"], info["access_key"], info["secret_key"], path)
    return None


def _is_daemon(pid: int) -> bool:
    """Whether ``pid`` is still a Ceph daemon: only those are ever signalled.

    A daemon stopping can show its main thread as a zombie while its other threads still
    run (and hold the ports), so a zombie counts until the process is gone.
    """
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() in DAEMONS
    except OSError:
        return False


def _kill(pid_file: Path, grace: float = 5.0) -> None:
    """SIGTERM the daemon of ``pid_file``, SIGKILL it after ``grace`` s; wait until it is gone."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _is_daemon(pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        end = time.monotonic() + wait
        while _is_daemon(pid) and time.monotonic() < end:
            time.sleep(0.05)
    with contextlib.suppress(OSError):
        pid_file.unlink()


def stop(path: Path) -> None:
    """Stop the daemons of the instance in ``path`` (gateway, OSD, monitor) and delete it."""
    path = Path(path)
    run = path / "run"
    for pid_file in [run / "client.rgw.pid", *sorted(run.glob("osd.*.pid")), *sorted(run.glob("mon.*.pid"))]:
        _kill(pid_file)
    shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "install"])
    args = parser.parse_args(argv)
    if args.command == "install":
        took = install()
        print(f"installed in {took:.1f} s" if took else "already installed", file=sys.stderr)
        return 0
    if args.command == "stop":
        with contextlib.suppress(OSError):
            stop(Path(STATE_FILE.read_text().strip()))
            STATE_FILE.unlink()
        return 0
    with contextlib.suppress(OSError):
        rgw = running(Path(STATE_FILE.read_text().strip()))
        if rgw is not None:
            print(f"already running in {rgw.path}", file=sys.stderr)
            print("export " + " ".join(f"{k}={v}" for k, v in rgw.env.items()))
            return 0
        stop(Path(STATE_FILE.read_text().strip()))  # stale: clean it up
    t0 = time.monotonic()
    try:
        rgw = start()
    except RgwError as e:
        print(e, file=sys.stderr)
        return 1
    STATE_FILE.write_text(str(rgw.path))
    print(f"ready in {time.monotonic() - t0:.1f} s; data in {rgw.path}", file=sys.stderr)
    print("export " + " ".join(f"{k}={v}" for k, v in rgw.env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
