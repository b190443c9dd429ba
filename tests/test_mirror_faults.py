"""Faults of a mirror against the real gateway (``s3_server``): an uploader SIGKILLed at
random instants, the gateway stopped mid-upload, a bucket that answers 403 or 500, and
packs, indexes and step records deleted or damaged in the bucket.

What must hold (``castore/mirror/transfer.py``, ``castore/storage/remote.py``): a bucket
never shows a half step (every step record it lists loads bit-exact); a failed upload is a
:class:`castore.MirrorError` raised once, with the step safe locally, and the next
``wait()`` uploads it; damage in the bucket is a typed error or a reported problem, never
a crash, and a pull of a damaged step commits nothing.

Every wait here is on a pipe, a condition or a bounded poll: nothing asserts on how long
something took.  The stores use :data:`FAST` retries so an unreachable server fails in
seconds, not the default's twenty.
"""

from __future__ import annotations

import http.client
import http.server
import os
import random
import sys
import threading
import time

import numpy as np
import pytest
from workload import Child, assert_state_equal

import castore
from castore.format import bucket as layout
from castore.mirror import MirrorOptions
from castore.storage.s3 import RetryPolicy

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNK_BYTES = 64 << 10
PACK_BYTES = 1 << 20
#: an unreachable server fails a request in a second or two
FAST = RetryPolicy(max_retries=2, initial_backoff=0.05, max_backoff=0.2, deadline=4.0, connect_timeout=1.0)
#: the killed writer's lock goes stale soon, so the parent's bucket GC need not wait long for it
CHILD_LOCK_TTL = 3.0
CHILD_STEPS = 8
CHILD_SCRIPT = (
    "import sys; sys.path.insert(0, {dir!r}); import test_mirror_faults as t; sys.exit(t.child(sys.argv[1:]))"
)


def state(step: int, mb: int = 2) -> dict:
    """The state saved as ``step``: a fixed part (dedup across steps) and ``mb - 1`` MiB new
    each step, both derived from ``step`` alone, so a checker knows every byte."""
    fixed = np.random.default_rng(1234).standard_normal((1 << 20) // 4, dtype=np.float32)
    fixed[(1 << 17) + step % 4 :: 97] += np.float32(step)  # the second half MiB: new chunks each step
    fresh = np.random.default_rng(step).integers(0, 1 << 62, ((mb - 1) << 20) // 8, dtype=np.int64)
    return {"model": {"w": fixed, "step": np.int64(step)}, "opt": {"m": fresh}}


def aws_env(server, **overrides) -> dict[str, str]:
    return dict(server.env, **overrides)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The process environment points at the gateway (Store(url) and mirror= read it)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3_server


def options(**overrides) -> MirrorOptions:
    return MirrorOptions(**dict(dict(pack_bytes=PACK_BYTES, retry=FAST), **overrides))


def bucket_objects(s3_admin, bucket: str, prefix: str) -> dict[str, int]:
    """``{key below prefix: size}`` of every object under ``prefix``."""
    pages = s3_admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :]: o["Size"] for page in pages for o in page.get("Contents", [])}


def check_bucket(url: str, expect_steps=None, *, verify: bool = True, mb: dict | None = None) -> list[int]:
    """Every step the bucket shows loads bit-exact (and ``verify`` is clean); its steps.
    ``mb``: ``{step: MiB}`` of steps saved as ``state(step, mb)``."""
    with castore.Store(url, readonly=True) as remote:
        steps = remote.steps()
        if expect_steps is not None:
            assert steps == expect_steps, f"{url}: steps {steps}, expected {expect_steps}"
        for step in steps:
            expected = state(step, (mb or {}).get(step, 2))
            assert_state_equal(remote.load(step), expected, f"<{url} step {step}>")
        assert remote.backend.problems == []
        if verify:
            report = remote.verify()
            assert report.ok and report.steps == len(steps), "\n".join(map(str, report.problems))
    return steps


# -- 1. the uploader SIGKILLed at random instants --------------------------------------------------


def child(argv: list[str]) -> int:
    """The writer: ``writer STORE URL``: save CHILD_STEPS steps after the store's latest with
    mirror=, one line per local commit (``saved <step> <uploads pending>``), then wait for the
    uploads (``uploaded``) and for stdin to close."""
    _, path, url = argv
    opts = options(lock_ttl=CHILD_LOCK_TTL)
    with castore.Store(path, chunk_bytes=CHUNK_BYTES, mirror=url, mirror_options=opts) as store:
        first = (store.latest() or -1) + 1
        print("open", first, store.mirror.pending(), flush=True)
        for step in range(first, first + CHILD_STEPS):
            try:
                store.save(step, state(step))
            except castore.MirrorError as exc:  # the step is committed; the next save retries
                print("mirror-error", str(exc).replace("\n", " "), flush=True)
            print("saved", step, store.mirror.pending(), flush=True)
            time.sleep(0.02)  # a training step
        store.wait()
        print("uploaded", flush=True)
        sys.stdin.read()
    return 0


@pytest.mark.parametrize("seed", range(3))
def test_uploader_killed_at_random_instants(s3_env, s3_admin, bucket, tmp_path, seed):
    """Two writers in turn, each SIGKILLed at a random instant (the second resumes the first's
    uploads at open); after each kill the bucket shows whole steps only.  Then a reopened
    store uploads what is left and bucket GC removes the orphans."""
    rng = random.Random(seed)
    url = f"s3://{bucket}/run"
    path = tmp_path / "store"
    saved: list[int] = []
    for kill in range(2):
        script = CHILD_SCRIPT.format(dir=HERE)
        with Child("writer", path, url, stdin=True, env=s3_env.env, script=script) as writer:
            # after a local commit, while uploads trail behind the saves (or after the last)
            writer.expect("saved", 60, nth=rng.randint(1, CHILD_STEPS))
            time.sleep(rng.uniform(0.0, 0.4))
            assert writer.kill() == -9, writer.describe()
            saved += [int(w[1]) for w in writer.words("saved")]
            lines = [line for _, line in writer.lines]
        # No half step: whatever the bucket lists loads bit-exact, and is a step a writer committed.
        remote_steps = check_bucket(url, verify=False)
        print(f"seed {seed} kill {kill}: lines {lines}; the bucket showed {remote_steps}")
        assert set(remote_steps) <= set(range(saved[-1] + 2)), (remote_steps, saved)
    # The uploads resume: the reopened store uploads every step the bucket lacks.
    with castore.Store(path, mirror=url, mirror_options=options()) as store:
        local = store.steps()
        assert set(saved) <= set(local) <= set(range(saved[-1] + 2)), (local, saved)  # +1: committed, unprinted
        store.wait()
        # An orphan pack as a kill between a pack and its index leaves (made here, so each run has one).
        orphan = layout.build_pack([(layout.CHUNK, bytes(32), b"orphan value")])
        s3_admin.put_object(Bucket=bucket, Key=f"run/{layout.pack_key(orphan.pack_id)}", Body=bytes(orphan.data))
        plan = gc_when_the_killed_lock_is_stale(store)
        assert layout.pack_key(orphan.pack_id) in plan.orphan_packs, plan
    objects = bucket_objects(s3_admin, bucket, "run")
    packs = {k.rpartition("/")[2] for k in objects if k.startswith("packs/")}
    indexes = {k.rpartition("/")[2] for k in objects if k.startswith("index/")}
    assert packs == indexes, f"packs without an index: {packs - indexes}, indexes without a pack: {indexes - packs}"
    assert check_bucket(url, local) == local


def gc_when_the_killed_lock_is_stale(store):
    """Bucket GC, once the killed writers' upload locks went stale (CHILD_LOCK_TTL s)."""
    deadline = time.monotonic() + 10 * CHILD_LOCK_TTL
    while True:
        try:
            return store.mirror_gc()
        except castore.BucketBusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


# -- 2. the gateway stopped and restarted mid-upload ------------------------------------------------

BIG = 12  #: MiB of the step whose upload the gateway's stop interrupts (a dozen packs)


@pytest.fixture
def restores_the_gateway(s3_server):
    """Whatever a test did to the shared gateway, it answers again afterwards."""
    import rgw

    yield s3_server
    if not rgw._http_ok(s3_server.endpoint):
        s3_server.start_gateway()


def gate_puts(objects, key_prefix: str, nth: int):
    """Make ``objects.put`` stop before its ``nth`` put of a ``key_prefix`` key until ``go`` is
    set (``reached`` is set then): the test acts while an upload is half done."""
    reached, go = threading.Event(), threading.Event()
    put, count, lock = objects.put, [0], threading.Lock()

    def gated(key, data):
        if key.startswith(key_prefix):
            with lock:
                count[0] += 1
                mine = count[0]
            if mine == nth:
                reached.set()
                assert go.wait(120), "the test never let the gated put go on"
        return put(key, data)

    objects.put = gated
    return reached, go


def test_gateway_stopped_and_restarted_mid_upload(s3_env, bucket, tmp_path, restores_the_gateway):
    url = f"s3://{bucket}/run"
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK_BYTES, mirror=url, mirror_options=options()) as store:
        store.save(0, state(0))
        store.wait()
        # the second pack of step 1 is up, its index not yet: then the gateway goes away
        reached, go = gate_puts(store.mirror.bucket.objects, layout.INDEX + "/", 2)
        store.save(1, state(1, BIG))
        assert reached.wait(60), "the upload of step 1 never reached its second index"
        s3_env.stop_gateway()
        go.set()
        with pytest.raises(castore.MirrorError) as info:
            store.wait()
        assert isinstance(info.value.__cause__, castore.RemoteUnavailableError), repr(info.value.__cause__)
        assert s3_env.secret_key not in str(info.value)
        store.mirror.raise_failed()  # raised once: nothing is left to raise
        assert store.mirror.pending() == 1
        assert_state_equal(store.load(1, verify=True), state(1, BIG))  # the step is safe locally
        s3_env.start_gateway()
        store.wait()  # the upload is retried and completes
        assert store.mirror.pending() == 0
        check_bucket(url, [0, 1], mb={1: BIG})
        plan = store.mirror_gc()  # the lock the failed upload could not release does not hold GC off
        assert not plan.orphan_packs or all(k.startswith("packs/") for k in plan.orphan_packs)
    check_bucket(url, [0, 1], mb={1: BIG})


# -- 3. a bucket that answers 403 or 500 --------------------------------------------------------


def test_wrong_secret_fails_the_open_without_the_secret(s3_env, bucket, tmp_path, monkeypatch, caplog):
    wrong = "WrongSecret0123456789abcdefWRONG"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    path = tmp_path / "store"
    with pytest.raises(castore.RemotePermissionError) as info:
        castore.Store(path, mirror=f"s3://{bucket}/run", mirror_options=options())
    assert info.value.status == 403
    text = "\n".join([str(info.value), repr(info.value), caplog.text])
    assert wrong not in text and s3_env.secret_key not in text
    assert "AWS_SECRET_ACCESS_KEY" in str(info.value)  # says what to check
    with castore.Store(path) as store:  # the failed open left the store closed and usable
        store.save(0, state(0))
    with pytest.raises(castore.RemotePermissionError):
        castore.Store(f"s3://{bucket}/run", readonly=True)


class Proxy(http.server.ThreadingHTTPServer):
    """A pass-through to the gateway that answers ``500 InternalError`` to every request
    once ``fail_after_puts`` PUTs went through (None: never), until told to stop failing."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream = upstream.removeprefix("http://")
        self.lock = threading.Lock()
        self.puts = 0
        self.fail_after_puts: int | None = None
        self.failed = 0  #: requests answered 500
        self.failing = threading.Event()  #: set at the first 500

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def should_fail(self, method: str) -> bool:
        with self.lock:
            if self.fail_after_puts is not None and self.puts >= self.fail_after_puts:
                self.failed += 1
                self.failing.set()
                return True
            self.puts += method == "PUT"
            return False


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy

    def log_message(self, *args):
        pass

    def relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.server.should_fail(self.command):
            reply = b"<?xml version='1.0'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
            return
        # the Host header goes on unchanged: the request's signature covers it
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay


@pytest.fixture
def proxy(s3_server):
    server = Proxy(s3_server.endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_server_errors_mid_upload_then_recovery(s3_env, bucket, tmp_path, proxy, monkeypatch):
    url = f"s3://{bucket}/run"
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # the mirror goes through the proxy
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK_BYTES, mirror=url, mirror_options=options()) as store:
        store.save(0, state(0))
        store.wait()
        with proxy.lock:
            proxy.fail_after_puts = proxy.puts + 3  # a pack or two of step 1 go up, then every request fails
        store.save(1, state(1, 6))
        assert proxy.failing.wait(60)
        with pytest.raises(castore.MirrorError) as info:
            store.wait()
        assert isinstance(info.value.__cause__, castore.RemoteUnavailableError), repr(info.value.__cause__)
        assert "HTTP 500" in str(info.value)
        store.mirror.raise_failed()  # once
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)  # readers go straight to the gateway
        check_bucket(url, [0])  # nothing half-visible: step 1 is not there, step 0 is whole
        assert_state_equal(store.load(1, verify=True), state(1, 6))
        with proxy.lock:
            proxy.fail_after_puts = None  # the server behaves again
        store.wait()
        assert store.mirror.pending() == 0
        check_bucket(url, [0, 1], mb={1: 6})
        store.mirror_gc()  # the lock the failed upload could not release does not hold GC off
    check_bucket(url, [0, 1], mb={1: 6})


# -- 4. packs, indexes and step records damaged in the bucket ----------------------------------------


@pytest.fixture
def mirrored(s3_env, s3_admin, bucket, tmp_path):
    """A bucket with steps 0-2 mirrored; ``packs[step]``: the pack objects that step's upload
    added (they hold its new chunks)."""
    url = f"s3://{bucket}/run"
    packs: dict[int, list[str]] = {}
    with castore.Store(tmp_path / "store", chunk_bytes=CHUNK_BYTES, mirror=url, mirror_options=options()) as store:
        for step in range(3):
            before = set(bucket_objects(s3_admin, bucket, "run"))
            store.save(step, state(step))
            store.wait()
            packs[step] = sorted(k for k in set(bucket_objects(s3_admin, bucket, "run")) - before if "packs/" in k)
    return url, bucket, packs


def admin_get(s3_admin, bucket: str, key: str) -> bytes:
    return s3_admin.get_object(Bucket=bucket, Key=f"run/{key}")["Body"].read()


def admin_put(s3_admin, bucket: str, key: str, data: bytes) -> None:
    s3_admin.put_object(Bucket=bucket, Key=f"run/{key}", Body=data)


def pull_commits_nothing(url: str, step: int, path) -> BaseException:
    """A pull of ``step`` into a fresh store fails with a typed error and commits nothing."""
    with castore.Store(path, chunk_bytes=CHUNK_BYTES) as local:
        with pytest.raises(castore.CastoreError) as info:
            local.pull(step, url=url)
        assert local.steps() == []
        assert local.verify().ok
    return info.value


def test_a_deleted_pack(mirrored, s3_admin, tmp_path):
    url, bucket, packs = mirrored
    s3_admin.delete_object(Bucket=bucket, Key=f"run/{packs[2][0]}")
    with castore.Store(url, readonly=True) as remote:
        report = remote.verify()
        assert not report.ok and report.affected_steps == [("main", 2)], report
        assert {p.kind for p in report.problems} == {"chunk-missing", "bucket"}, report.problems
        named = [p.detail for p in report.problems if p.kind == "bucket"]
        assert len(named) == 1 and named[0].startswith(packs[2][0] + ": missing"), named  # the pack, by name
        chunks = [p for p in report.problems if p.kind == "chunk-missing"]
        assert all(p.component in ("model", "opt") and p.chunk and p.path for p in chunks)
        for step in (0, 1):
            assert_state_equal(remote.load(step), state(step))
        with pytest.raises(castore.ChunkMissingError) as info:
            remote.load(2)
        assert info.value.step == 2 and info.value.component in ("model", "opt")
    assert isinstance(pull_commits_nothing(url, 2, tmp_path / "pulled"), castore.ChunkMissingError)


def test_a_damaged_pack(mirrored, s3_admin, tmp_path):
    url, bucket, packs = mirrored
    data = bytearray(admin_get(s3_admin, bucket, packs[2][0]))
    data[100] ^= 0xFF  # inside the pack's first value
    admin_put(s3_admin, bucket, packs[2][0], bytes(data))
    with castore.Store(url, readonly=True) as remote:
        report = remote.verify()
        assert report.affected_steps == [("main", 2)], report
        assert {p.kind for p in report.problems} == {"chunk-corrupt"}, report.problems
        with pytest.raises(castore.ChunkCorruptError):
            remote.load(2, verify=True)
        assert_state_equal(remote.load(1), state(1))
    assert isinstance(pull_commits_nothing(url, 2, tmp_path / "pulled"), castore.ChunkCorruptError)


def test_a_pack_cut_short(mirrored, s3_admin, tmp_path):
    url, bucket, packs = mirrored
    data = admin_get(s3_admin, bucket, packs[2][-1])
    admin_put(s3_admin, bucket, packs[2][-1], data[: len(data) // 2])
    with castore.Store(url, readonly=True) as remote:
        report = remote.verify()
        assert report.affected_steps == [("main", 2)], report
        assert {p.kind for p in report.problems} <= {"chunk-missing", "chunk-corrupt", "bucket"}, report.problems
        named = [p.detail for p in report.problems if p.kind == "bucket"]  # the index no longer fits its pack
        assert named and all(packs[2][-1].rpartition("/")[2] in d for d in named), named
        with pytest.raises(castore.IntegrityError):
            remote.load(2)
    assert isinstance(pull_commits_nothing(url, 2, tmp_path / "pulled"), castore.IntegrityError)


def gc_repairs(url: str, path, pack_id: str) -> None:
    """Bucket GC writes the pack's index object again from its trailer; then nothing is wrong."""
    with castore.Store(path) as store:
        plan = store.mirror_gc(url=url)
    assert plan.reindex == [pack_id] and plan.missing_values == 0, plan
    assert layout.pack_key(pack_id) not in plan.orphan_packs + plan.kept_packs
    with castore.Store(url, readonly=True) as remote:
        report = remote.verify()
        assert report.ok, report.problems
        for step in range(3):
            assert_state_equal(remote.load(step, verify=True), state(step))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_index_is_survived_through_the_pack_trailer(mirrored, s3_admin, tmp_path, damage):
    url, bucket, packs = mirrored
    pack_id = packs[2][0].rpartition("/")[2]
    key = layout.index_key(pack_id)
    good = admin_get(s3_admin, bucket, key)
    admin_put(s3_admin, bucket, key, {"garbage": b"\x00garbage" * 9, "truncated": good[:-9]}[damage])
    with castore.Store(url, readonly=True) as remote:
        for step in range(3):
            assert_state_equal(remote.load(step, verify=True), state(step))
        report = remote.verify()
        assert report.affected_steps == [], report  # every step is whole; the index object is named
        assert [p.kind for p in report.problems] == ["bucket"] and key in report.problems[0].detail, report
        assert key in dict(remote.backend.problems), remote.backend.problems
    # the pull reads the pack through its trailer as well
    with castore.Store(tmp_path / "pulled", chunk_bytes=CHUNK_BYTES) as local:
        assert local.pull(2, url=url) == 2
        assert_state_equal(local.load(2, verify=True), state(2))
    gc_repairs(url, tmp_path / "gc", pack_id)
    assert admin_get(s3_admin, bucket, key) == good


def test_another_packs_index_in_place_is_survived_and_repaired(mirrored, s3_admin, tmp_path):
    """A sealed, valid index of pack B stored as pack A's: it does not fit A's size, so A's
    own trailer is read instead, every step loads, verify names the index object, and
    bucket GC writes A's index again."""
    url, bucket, packs = mirrored
    a, b = (packs[step][0].rpartition("/")[2] for step in (2, 1))
    good = admin_get(s3_admin, bucket, layout.index_key(a))
    admin_put(s3_admin, bucket, layout.index_key(a), admin_get(s3_admin, bucket, layout.index_key(b)))
    with castore.Store(url, readonly=True) as remote:
        for step in range(3):
            assert_state_equal(remote.load(step, verify=True), state(step))
        report = remote.verify()
        assert report.affected_steps == [] and [p.kind for p in report.problems] == ["bucket"], report
        assert layout.index_key(a) in report.problems[0].detail and "does not fit its pack" in report.problems[0].detail
    gc_repairs(url, tmp_path / "gc", a)
    assert admin_get(s3_admin, bucket, layout.index_key(a)) == good


def test_a_deleted_index(mirrored, s3_admin, tmp_path):
    """A pack without its index is what a killed upload leaves: its values are not in the
    bucket's index, so the step that needs them is reported, and loads fail typed.  Bucket
    GC does not take it for garbage: its trailer lists values a step needs, so its index is
    written again, and the step loads."""
    url, bucket, packs = mirrored
    pack_id = packs[2][0].rpartition("/")[2]
    s3_admin.delete_object(Bucket=bucket, Key=f"run/{layout.index_key(pack_id)}")
    with castore.Store(url, readonly=True) as remote:
        report = remote.verify()
        assert report.affected_steps == [("main", 2)] and {p.kind for p in report.problems} == {"chunk-missing"}
        with pytest.raises(castore.ChunkMissingError):
            remote.load(2)
        assert_state_equal(remote.load(1), state(1))
    assert isinstance(pull_commits_nothing(url, 2, tmp_path / "pulled"), castore.ChunkMissingError)
    gc_repairs(url, tmp_path / "gc", pack_id)


@pytest.mark.parametrize("damage", ["garbage", "another step's", "empty"])
def test_a_damaged_step_record(mirrored, s3_admin, tmp_path, damage):
    url, bucket, _ = mirrored
    key = layout.step_object(castore.format.keys.step_key(2, "main"))
    other = admin_get(s3_admin, bucket, layout.step_object(castore.format.keys.step_key(1, "main")))
    admin_put(
        s3_admin, bucket, key, {"garbage": b"\x00" + os.urandom(300), "another step's": other, "empty": b""}[damage]
    )
    with castore.Store(url, readonly=True) as remote:
        assert remote.steps() == [0, 1]  # left out, and named
        assert [name for name, _ in remote.backend.problems] == [key], remote.backend.problems
        with pytest.raises(castore.StepNotFoundError):
            remote.load(2)
        report = remote.verify()  # does not raise: names the record
        assert report.affected_steps == [] and [p.kind for p in report.problems] == ["bucket"], report
        assert key in report.problems[0].detail
        for step in (0, 1):
            assert_state_equal(remote.load(step), state(step))
    error = pull_commits_nothing(url, 2, tmp_path / "pulled")
    assert isinstance(error, castore.CorruptDataError), repr(error)
    # bucket GC refuses: it must see every root, or it would free what step 2 names
    with castore.Store(tmp_path / "gc") as store:
        with pytest.raises(castore.CorruptDataError):
            store.mirror_gc(url=url)
    with castore.Store(url, readonly=True) as remote:
        assert_state_equal(remote.load(1), state(1))
