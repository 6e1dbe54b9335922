"""Shards in an object store, against a real S3 API on localhost (moto's S3 behind werkzeug, checking
signatures; s3server.py), configured the way users configure theirs: S3_ENDPOINT_URL + AWS_* variables.

The README's recipe, step by step: data_prep encodes straight into s3://bucket/prefix (a killed worker's
rerun redoes only its unfinished slices), merge and verify run on the URL; the trainer streams the
shards into a node-local cache on 2 ranks, resumes mid-epoch bit-exactly, reads nothing but the index
again on a warm cache, keeps training under a cache limit (evicting and fetching again) and across an
outage of the store; wrong credentials and a missing bucket fail `--check` naming the URL; a corrupted
object is caught by its shard hash and named.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_launch import REPO, TOTAL, N, child_env, ckpt, metrics, reference_overrides, start_training, train

pytestmark = [pytest.mark.distributed, pytest.mark.s3]

BUCKET, PREFIX, SLICES = "ditscale-data", "digits", 8
URL = f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture(scope="module")
def s3():
    from s3server import S3Server

    try:
        server = S3Server().start()
        server.client().create_bucket(Bucket=BUCKET)
    except Exception as e:  # moto missing or no loopback socket: say why
        pytest.skip(f"the local S3 server cannot start: {type(e).__name__}: {e}")
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def data_prep(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args],
        cwd=REPO,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def bucket_dataset(s3, digits64, tmp_path_factory) -> str:
    """digits64's images encoded by 1 worker straight into the bucket as 8 slices (one shard each), the
    first attempt SIGKILLed inside slice 2; then merged and verified there."""
    images = Path(digits64).parent / "images"  # conftest.digits_dataset writes them there
    assert len(list(images.glob("*/*.png"))) == 64
    encode = [
        "encode",
        "--input",
        str(images),
        "--out",
        URL,
        "--resolution",
        "8",
        "--vae",
        "none",
        "--image-channels",
        "1",
        "--num-slices",
        str(SLICES),
        "--decode-workers",
        "0",
        "--compression",
        "zstd",  # as VAE posteriors are stored: the cache then holds compressed and decompressed shards
        "--no-progress",
        "--staging",
        str(tmp_path_factory.mktemp("staging")),
    ]
    killed = data_prep(*encode, env={"DATA_PREP_TEST_KILL_AFTER": "20"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    done = {o["Key"]: o["LastModified"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"]}
    assert f"{PREFIX}/slice-00001-of-00008/summary.json" in done
    assert f"{PREFIX}/slice-00002-of-00008/summary.json" not in done

    rerun = data_prep(*encode)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "slice-00001-of-00008: already complete" in rerun.stderr
    after = {o["Key"]: o["LastModified"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"]}
    assert all(after[k] == t for k, t in done.items() if "slice-00001" in k), "a complete slice was written again"
    merged = data_prep("merge", URL)
    assert merged.returncode == 0, merged.stderr[-3000:]
    verified = data_prep("verify", URL)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    return URL


def shard_keys(s3) -> list[str]:
    return sorted(
        o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"] if ".mds" in o["Key"]
    )


def shard_gets(s3) -> int:
    return sum(r.method == "GET" and ".mds" in r.path and r.status == 200 for r in s3.requests)


@contextlib.contextmanager
def removed(s3, key: str):
    client = s3.client()
    good = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.delete_object(Bucket=BUCKET, Key=key)
    try:
        yield
    finally:
        client.put_object(Bucket=BUCKET, Key=key, Body=good)


@contextlib.contextmanager
def corrupted(s3, key: str):
    """One byte of an object flipped in place (same size), restored afterwards."""
    client = s3.client()
    good = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x40
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(bad))
    try:
        yield
    finally:
        client.put_object(Bucket=BUCKET, Key=key, Body=good)


# ---------------------------------------------------------------------------------------------------------
# data_prep and --check against the bucket
# ---------------------------------------------------------------------------------------------------------


def test_data_prep_writes_a_complete_dataset_to_the_bucket(s3, bucket_dataset):
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"]}
    assert {f"{PREFIX}/dataset.json", f"{PREFIX}/index.json"} <= keys
    assert len(shard_keys(s3)) == SLICES
    key = shard_keys(s3)[2]
    with corrupted(s3, key):
        bad = data_prep("verify", URL)
    assert bad.returncode != 0
    assert key.removeprefix(f"{PREFIX}/") in bad.stderr and f"{URL}: FAILED" in bad.stderr, bad.stderr[-3000:]


def check(data_root: str, run_dir, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "ditscale.train",
        "--config",
        "configs/tiny_test.yaml",
        f"data.root={data_root}",
        f"run_dir={run_dir}",
        "--check",
    ]
    return subprocess.run(cmd, cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=300)


def test_check_names_the_url_for_credentials_buckets_and_missing_shards(s3, bucket_dataset, tmp_path):
    ok = check(URL, tmp_path / "run")
    assert ok.returncode == 0, ok.stderr[-3000:]
    denied = check(URL, tmp_path / "run", env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert denied.returncode == 2 and f"{URL}/dataset.json: access denied by {s3.endpoint}" in denied.stderr, (
        denied.stderr[-3000:]
    )
    missing = check(f"s3://no-such-bucket/{PREFIX}", tmp_path / "run")
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert f"bucket 'no-such-bucket' does not exist at {s3.endpoint}" in missing.stderr
    key = shard_keys(s3)[3]
    with removed(s3, key):
        gone = check(URL, tmp_path / "run")
    assert gone.returncode == 2 and f"s3://{BUCKET}/{key}: missing" in gone.stderr, gone.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------
# The trainer streaming from the bucket
# ---------------------------------------------------------------------------------------------------------


def test_train_from_the_bucket_resumes_exactly_and_a_warm_cache_fetches_no_shard(s3, bucket_dataset, tmp_path):
    """Reference: 2 ranks, ZeRO-1, TOTAL steps with a cold cache (shards fetched). Then a resume from its
    mid-epoch checkpoint at step N in another run_dir on the same (now warm) cache: the same losses, data
    and final state bit for bit, and no shard fetched again (dataset.json and index.json are read to
    know the cache is current)."""
    from test_resume import assert_same_state

    cache = tmp_path / "cache"
    s3.reset()
    ref = train(2, reference_overrides(1, tmp_path / "ref", URL, f"data.cache={cache}"), tmp_path / "ref.log")
    assert ref.returncode == 0, ref.output[-5000:]
    assert shard_gets(s3) >= SLICES

    s3.reset()
    run = tmp_path / "resumed"
    resumed = train(
        2,
        reference_overrides(1, run, URL, f"data.cache={cache}", f"train.resume={ckpt(tmp_path / 'ref', N)}"),
        tmp_path / "resumed.log",
    )
    assert resumed.returncode == 0, resumed.output[-5000:]
    assert shard_gets(s3) == 0, [r for r in s3.requests if ".mds" in r.path]
    ma, mb = metrics(tmp_path / "ref"), metrics(run)
    for step in range(N + 1, TOTAL + 1):
        for key in ("loss", "grad_norm", "index_sum", "index_sqsum"):
            assert ma[step][key] == mb[step][key], (step, key)
    assert_same_state(ckpt(tmp_path / "ref", TOTAL), ckpt(run, TOTAL))


def test_cache_limit_evicts_and_an_outage_of_the_store_is_waited_out(s3, bucket_dataset, tmp_path):
    """A cache with room for the index and four of the largest shards (compressed + decompressed) holds about
    four of the eight shards: shards are evicted and fetched again every epoch. The
    store goes down right after the second shard is fetched (early in epoch 1): the loader waits, saying so and
    naming the endpoint; the store comes back; the run finishes every step."""
    body = s3.client().get_object(Bucket=BUCKET, Key=f"{PREFIX}/index.json")["Body"].read()
    index = json.loads(body)
    raw = max(sh["raw_data"]["bytes"] for sh in index["shards"])
    zipped = max(sh["zip_data"]["bytes"] for sh in index["shards"])
    s3.reset()
    s3.stop_after(2, ".mds")
    run_dir, steps = tmp_path / "run", 3 * 64 // 8  # three epochs
    run = start_training(
        2,
        reference_overrides(
            1,
            run_dir,
            URL,
            f"data.cache={tmp_path / 'cache'}",
            f"data.cache_limit={len(body) + 4 * (raw + zipped)}",
            "data.remote_wait_s=300",
            f"train.max_steps={steps}",
            f"train.ckpt_every={steps}",
        ),
        tmp_path / "run.log",
    )
    try:
        run.wait_for(lambda text: f"cannot reach {s3.endpoint}" in text and "retrying in" in text, "the wait")
        assert not s3.running
        time.sleep(3)
    finally:
        if not s3.running:
            s3.start()
    assert run.wait() == 0, run.text()[-5000:]
    assert sorted(metrics(run_dir)) == list(range(1, steps + 1))
    assert shard_gets(s3) > SLICES, "with the cache limit, evicted shards are fetched again"


# ---------------------------------------------------------------------------------------------------------
# The reader in this process: a corrupted object, a store that does not come back
# ---------------------------------------------------------------------------------------------------------


def open_reader(root: str, cache, **kwargs):
    from ditscale.data import build_dataloader, build_dataset

    dataset = build_dataset(root, batch_size=8, seed=0, local=str(cache), **kwargs)
    return build_dataloader(dataset, batch_size=8, num_workers=0)


def read_all(root: str, cache, **kwargs) -> int:
    return sum(len(b["label"]) for b in open_reader(root, cache, **kwargs))


@pytest.mark.timeout(240)  # in this process: a hang fails here, with its stack, not at the suite's limit
def test_a_corrupted_object_is_caught_by_its_hash_and_named(s3, bucket_dataset, tmp_path):
    from ditscale.data.integrity import DataError

    key = shard_keys(s3)[1]
    with corrupted(s3, key), pytest.raises(DataError, match=re.escape(f"s3://{BUCKET}/{key}")):
        read_all(URL, tmp_path / "cache")
    assert read_all(URL, tmp_path / "cache2") == 64


@pytest.mark.timeout(240)  # in this process: a hang fails here, with its stack, not at the suite's limit
def test_a_store_that_stays_away_stops_the_reader_naming_endpoint_and_shard(s3, bucket_dataset, tmp_path):
    from ditscale.data.storage import RemoteError

    loader = open_reader(URL, tmp_path / "cache", remote_wait_s=4)  # dataset.json and index read
    s3.stop()
    start = time.monotonic()
    try:
        with pytest.raises(Exception) as caught:
            sum(len(b["label"]) for b in loader)
    finally:
        s3.start()
    text = str(caught.value)
    assert isinstance(caught.value, (RemoteError, OSError, ValueError)), repr(caught.value)
    assert s3.endpoint in text and URL in text and "data.remote_wait_s" in text, text
    assert time.monotonic() - start < 120
