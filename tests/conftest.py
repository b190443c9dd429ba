import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from workload import assert_state_equal as assert_tree_equal  # noqa: F401  (one bit-exact check)

import castore

#: Runs a child as root without any capability (CI runs as root).  File permissions then apply
#: to it as to any user: it owns the files, whose owner bits the tests take away too.  Unlike
#: another user it runs this very interpreter, standard library and virtualenv, wherever the
#: checkout, the venv or the interpreter live (under a home or a clone of mode 0700 too).
WITHOUT_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]


@pytest.fixture
def drop_big_stores_of_passing_tests(request, tmp_path):
    """Stores of the crash and concurrency tests take tens to hundreds of MB: keep them
    only for tests that failed, for a post-mortem."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def store(tmp_path):
    with castore.Store(tmp_path / "store", chunk_bytes=64 << 10) as s:
        yield s


@pytest.fixture
def as_other_user():
    """``(prefix, top)``: a command prefix running a child without root's rights (empty when
    the tests do not run as root), and a directory of this user the child may be kept out of.

    Skips only where the platform cannot drop root's rights (no ``setpriv``, no CAP_SETPCAP).
    """
    user: list[str] = []  # not root: permissions apply to this user already
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is not installed: cannot run a child without root's rights")
        user = WITHOUT_CAPABILITIES
        if subprocess.run([*user, "true"], capture_output=True).returncode != 0:
            pytest.skip("setpriv cannot drop this root's capabilities (no CAP_SETPCAP?)")
    top = Path(tempfile.mkdtemp(prefix="castore-perm-"))
    # The premise of the tests: the child cannot write where the permissions say it may not.
    (top / "closed").mkdir(mode=0o555)
    probe = subprocess.run(
        [*user, sys.executable, "-c", "open(__import__('sys').argv[1], 'x')", str(top / "closed" / "probe")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "PermissionError" in probe.stderr, f"the child wrote into a 0555 directory: {probe}"
    yield user, top
    for sub in [top, *top.rglob("*")]:
        if sub.is_dir():
            sub.chmod(0o755)
    shutil.rmtree(top)


# -- a real S3 server (Ceph RADOS Gateway, tests/rgw.py) for the tests that ask for one ----------


@pytest.fixture(scope="session")
def s3_server():
    """A RADOS Gateway on 127.0.0.1 for the whole session (:class:`rgw.Rgw`: endpoint, keys).

    Started by the first test that asks for it (about 3 s; the Debian packages are installed
    first if missing, as root), stopped at the session's end whatever happened.  If it
    cannot start, the tests asking for it fail with the reason and the daemons' log tails:
    ``make test`` installs what it needs, so a missing server is a broken setup, not a skip.
    """
    import rgw  # beside this file; imported here so that sessions without S3 tests never load it

    try:
        server = rgw.start(owner=os.getpid())
    except rgw.RgwError as e:
        pytest.fail(f"cannot start the S3 server for the tests: {e}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_admin(s3_server):
    """A boto3 client of the test server's user, for what the object store does not do
    (creating and removing buckets)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3}),
    )


@pytest.fixture
def bucket(s3_admin):
    """A fresh bucket (a unique name) for one test; deleted with everything in it after."""
    import uuid

    name = f"t-{uuid.uuid4().hex[:16]}"
    s3_admin.create_bucket(Bucket=name)
    yield name
    pages = s3_admin.get_paginator("list_objects_v2").paginate(Bucket=name)
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    for i in range(0, len(keys), 1000):
        s3_admin.delete_objects(Bucket=name, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
    s3_admin.delete_bucket(Bucket=name)
