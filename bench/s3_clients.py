"""boto3 against obstore on a real S3 server: which client castore's object store uses.

    python bench/s3_clients.py [--big 8] [--small 400] [--threads 8] [--rounds 2]

Against the gateway the AWS variables name (``AWS_ENDPOINT_URL`` ...), or else a fresh
local RADOS Gateway (``tests/rgw.py``, stopped after).  Each client, in turns within one
run, puts and gets: ``--big`` objects of 32 MiB (one after another: each is one multipart
upload / one streamed get, parts in parallel inside the client), and ``--small`` objects
of 1 MiB from ``--threads`` threads (obstore also from asyncio, as many in flight).
Every figure is printed as MiB/s and as a ratio to boto3's in the same run; the best of
``--rounds`` rounds counts (the machine is shared and noisy).  The bytes are random
(nothing compresses) and checked after each get.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import obstore
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from obstore.store import S3Store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import rgw  # the project's gateway setup, beside the tests

MiB = 1 << 20
#: both clients' multipart part size and parallelism, so the comparison is of clients, not settings
PART = 8 * MiB
PART_CONCURRENCY = 8


def boto_client(env: dict[str, str], pool: int):
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=pool, retries={"mode": "standard"}),
    )


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(env: dict[str, str], big: int, small: int, threads: int) -> dict[str, dict[str, float]]:
    """MiB/s per (client, case) for one round."""
    s3 = boto_client(env, pool=max(threads, PART_CONCURRENCY) * 2)
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    ob = S3Store(
        bucket,
        endpoint=env["AWS_ENDPOINT_URL"],
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )
    big_data = [os.urandom(32 * MiB) for _ in range(big)]
    one = os.urandom(MiB)
    transfer = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=PART_CONCURRENCY)
    out: dict[str, dict[str, float]] = {"boto3": {}, "obstore": {}}
    big_mib, small_mib = big * 32, small

    def boto_big_put():
        import io

        for i, data in enumerate(big_data):
            s3.upload_fileobj(io.BytesIO(data), bucket, f"boto/big/{i}", Config=transfer)

    def boto_big_get():
        import io

        for i, data in enumerate(big_data):
            buf = io.BytesIO()
            s3.download_fileobj(bucket, f"boto/big/{i}", buf, Config=transfer)
            assert buf.getvalue() == data

    def boto_small_put():
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda i: s3.put_object(Bucket=bucket, Key=f"boto/small/{i}", Body=one), range(small)))

    def boto_small_get():
        with ThreadPoolExecutor(threads) as ex:
            got = ex.map(lambda i: s3.get_object(Bucket=bucket, Key=f"boto/small/{i}")["Body"].read(), range(small))
            assert all(g == one for g in got)

    def ob_big_put():
        for i, data in enumerate(big_data):
            obstore.put(ob, f"ob/big/{i}", data, chunk_size=PART, max_concurrency=PART_CONCURRENCY)

    def ob_big_get():
        for i, data in enumerate(big_data):
            assert obstore.get(ob, f"ob/big/{i}").bytes() == data

    def ob_small_put():
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda i: obstore.put(ob, f"ob/small/{i}", one), range(small)))

    def ob_small_get():
        with ThreadPoolExecutor(threads) as ex:
            assert all(g == one for g in ex.map(lambda i: obstore.get(ob, f"ob/small/{i}").bytes(), range(small)))

    async def ob_small_put_async():
        sem = asyncio.Semaphore(threads)

        async def one_put(i):
            async with sem:
                await obstore.put_async(ob, f"oba/small/{i}", one)

        await asyncio.gather(*(one_put(i) for i in range(small)))

    async def ob_small_get_async():
        sem = asyncio.Semaphore(threads)

        async def one_get(i):
            async with sem:
                return (await (await obstore.get_async(ob, f"oba/small/{i}")).bytes_async()) == one

        assert all(await asyncio.gather(*(one_get(i) for i in range(small))))

    try:
        out["boto3"]["big put"] = big_mib / timed(boto_big_put)
        out["obstore"]["big put"] = big_mib / timed(ob_big_put)
        out["boto3"]["big get"] = big_mib / timed(boto_big_get)
        out["obstore"]["big get"] = big_mib / timed(ob_big_get)
        out["boto3"]["small put"] = small_mib / timed(boto_small_put)
        out["obstore"]["small put"] = small_mib / timed(ob_small_put)
        out["obstore"]["small put (asyncio)"] = small_mib / timed(lambda: asyncio.run(ob_small_put_async()))
        out["boto3"]["small get"] = small_mib / timed(boto_small_get)
        out["obstore"]["small get"] = small_mib / timed(ob_small_get)
        out["obstore"]["small get (asyncio)"] = small_mib / timed(lambda: asyncio.run(ob_small_get_async()))
    finally:
        keys = [
            o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in p.get("Contents", [])
        ]
        for i in range(0, len(keys), 1000):
            s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
        s3.delete_bucket(Bucket=bucket)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", type=int, default=8, help="32 MiB objects")
    parser.add_argument("--small", type=int, default=400, help="1 MiB objects")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    server = None
    if "AWS_ENDPOINT_URL" in os.environ:
        env = dict(os.environ)
    else:
        t0 = time.monotonic()
        server = rgw.start(owner=os.getpid())
        print(f"started a RADOS Gateway in {time.monotonic() - t0:.1f} s at {server.endpoint}", file=sys.stderr)
        env = {**os.environ, **server.env}
    try:
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for client, cases in run(env, args.big, args.small, args.threads).items():
                for case, mibs in cases.items():
                    best.setdefault(client, {})[case] = max(best.get(client, {}).get(case, 0.0), mibs)
    finally:
        if server is not None:
            server.stop()
    print(
        f"{args.big} x 32 MiB one at a time (parts of {PART // MiB} MiB, {PART_CONCURRENCY} in parallel); "
        f"{args.small} x 1 MiB from {args.threads} threads; best of {args.rounds} rounds; MiB/s\n"
    )
    print("| case | boto3 MiB/s | obstore MiB/s | obstore/boto3 |")
    print("|---|---|---|---|")
    for case, ob in best["obstore"].items():
        base = best["boto3"].get(case.replace(" (asyncio)", ""))
        print(f"| {case} | {base:.0f} | {ob:.0f} | {ob / base:.2f} |" if base else f"| {case} | - | {ob:.0f} | - |")


if __name__ == "__main__":
    main()
