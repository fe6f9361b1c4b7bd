"""S3Store against moto: streamed transfers, listings, safe moves, error translation."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC
from pathlib import Path
from typing import Any, cast

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from processor.aws.s3 import S3Store, is_s3_uri, join_uri, split_uri
from processor.errors import AwsError, ConfigError, NotFound, ServiceUnavailable, Throttled
from processor.pipeline import stage_local
from processor.settings import Settings
from processor.stage import committed_segments
from processor.steps import bucket_load, bucket_steps
from processor.store import LocalStore, S3StagingStore
from tests.builders import WriteCsv, item, order

BUCKET = "landing"
MiB = 1024 * 1024
# moto enforces S3's 5 MiB minimum part size, so the smallest multipart setting is 5 MiB parts.
SMALL_PARTS = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)


@pytest.fixture(scope="module")
def shared_client() -> Any:
    # Building a client costs ~0.1 s; moto intercepts any client while a mock is active, so one is enough.
    return boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")


@pytest.fixture
def client(aws: None, shared_client: Any) -> Any:
    shared_client.create_bucket(Bucket=BUCKET)
    return shared_client


@pytest.fixture
def store(client: Any) -> S3Store:
    return S3Store(client, BUCKET, transfer=SMALL_PARTS, copy_transfer=SMALL_PARTS)


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(12 * MiB + 123)  # three parts, the last one short


class Spy:
    """Delegates to a real client, records every method called, and lets a test replace one method."""

    def __init__(self, real: Any, **overrides: Any) -> None:
        self._real = real
        self._overrides = overrides
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        target = self._overrides.get(name) or getattr(self._real, name)
        if not callable(target) or name in ("get_paginator", "meta", "exceptions"):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return target(*args, **kwargs)

        return call


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_multi_mb_file_uploads_in_parts_and_downloads_to_disk_intact(
    store: S3Store, payload: bytes, tmp_path: Path
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    store.upload(src, "incoming/orders/big.csv")

    info = store.head("incoming/orders/big.csv")
    assert info.size == len(payload)
    assert info.etag.endswith("-3")  # a multipart ETag: the upload was streamed in parts

    dest = tmp_path / "nested" / "dir" / "big.csv"
    assert store.download("incoming/orders/big.csv", dest) == dest
    assert _sha(dest.read_bytes()) == _sha(payload)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["big.csv"]  # no temporary file left behind


def test_iter_chunks_streams_the_body_in_bounded_chunks(store: S3Store, payload: bytes) -> None:
    store.put_bytes("k", payload)
    chunks = list(store.iter_chunks("k", chunk_size=4 * MiB))
    assert max(len(c) for c in chunks) <= 4 * MiB
    assert b"".join(chunks) == payload


def test_put_get_head_exists_and_delete(store: S3Store) -> None:
    store.put_bytes("rejected/r.json", b'{"reason": "empty_file"}', content_type="application/json")
    assert store.get_bytes("rejected/r.json") == b'{"reason": "empty_file"}'
    assert store.exists("rejected/r.json")

    info = store.head("rejected/r.json")
    assert (info.key, info.size) == ("rejected/r.json", 24)
    assert '"' not in info.etag
    assert info.last_modified.tzinfo is UTC

    store.delete("rejected/r.json")
    assert not store.exists("rejected/r.json")
    store.delete("rejected/r.json")  # deleting a missing key is not an error


def test_list_keys_follows_pagination_and_respects_prefix(store: S3Store) -> None:
    for i in range(7):
        store.put_bytes(f"incoming/orders/part{i}.csv", b"x")
    store.put_bytes("archive/orders/old.csv", b"x")
    keys = list(store.list_keys("incoming/", page_size=3))
    assert keys == [f"incoming/orders/part{i}.csv" for i in range(7)]
    assert [o.size for o in store.list_objects("archive/")] == [1]


def test_missing_key_is_not_found_with_aws_code_and_operation(store: S3Store, tmp_path: Path) -> None:
    with pytest.raises(NotFound) as e:
        store.get_bytes("nope")
    assert e.value.context["aws_code"] == "NoSuchKey"
    assert e.value.context["operation"] == "s3.get_object"
    assert e.value.context["key"] == "nope"
    assert not e.value.retryable

    with pytest.raises(NotFound):
        store.head("nope")  # HEAD has no body: S3 reports only the status
    with pytest.raises(NotFound):
        store.download("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_missing_bucket_is_not_found(client: Any) -> None:
    with pytest.raises(NotFound) as e:
        S3Store(client, "no-such-bucket").put_bytes("k", b"x")
    assert e.value.context["aws_code"] == "NoSuchBucket"


def test_throttling_reply_becomes_throttled(client: Any) -> None:
    with Stubber(client) as stub:
        stub.add_client_error("get_object", service_error_code="SlowDown", http_status_code=503)
        with pytest.raises(Throttled) as e:
            S3Store(client, BUCKET).get_bytes("k")
    assert e.value.retryable
    assert e.value.context["aws_code"] == "SlowDown"
    assert e.value.context["http_status"] == 503


def test_move_copies_then_deletes_the_source(store: S3Store) -> None:
    store.put_bytes("incoming/orders.csv", b"a,b\n1,2\n")
    dst = store.move("incoming/orders.csv", "archive/orders/2025-03-30/orders.csv")
    assert dst.size == 8
    assert store.get_bytes("archive/orders/2025-03-30/orders.csv") == b"a,b\n1,2\n"
    assert not store.exists("incoming/orders.csv")


def test_move_of_a_large_object_uses_multipart_copy(client: Any, payload: bytes) -> None:
    spy = Spy(client)
    store = S3Store(cast(Any, spy), BUCKET, copy_transfer=SMALL_PARTS)
    client.put_object(Bucket=BUCKET, Key="incoming/big.csv", Body=payload)
    store.move("incoming/big.csv", "archive/big.csv")
    assert not store.exists("incoming/big.csv")
    body = client.get_object(Bucket=BUCKET, Key="archive/big.csv")["Body"].read()
    assert _sha(body) == _sha(payload)
    # the copy is delegated to the managed transfer, and the source is deleted only after it
    assert spy.calls.index("delete_object") > spy.calls.index("copy")


def test_move_keeps_the_source_when_the_copy_fails(client: Any) -> None:
    def failing_copy(*args: Any, **kwargs: Any) -> None:
        response: Any = {
            "Error": {"Code": "InternalError", "Message": "boom"},
            "ResponseMetadata": {"HTTPStatusCode": 500},
        }
        raise ClientError(response, "UploadPartCopy")

    spy = Spy(client, copy=failing_copy)
    store = S3Store(cast(Any, spy), BUCKET)
    client.put_object(Bucket=BUCKET, Key="incoming/a.csv", Body=b"data")

    with pytest.raises(ServiceUnavailable) as e:
        store.move("incoming/a.csv", "archive/a.csv")
    assert e.value.retryable
    assert "delete_object" not in spy.calls
    assert store.get_bytes("incoming/a.csv") == b"data"
    assert not store.exists("archive/a.csv")


def test_move_keeps_the_source_when_the_copy_is_incomplete(client: Any) -> None:
    def truncating_copy(copy_source: Any, bucket: str, key: str, **kwargs: Any) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=b"da")

    store = S3Store(cast(Any, Spy(client, copy=truncating_copy)), BUCKET)
    client.put_object(Bucket=BUCKET, Key="incoming/a.csv", Body=b"data")
    with pytest.raises(AwsError, match="source kept"):
        store.move("incoming/a.csv", "archive/a.csv")
    assert store.get_bytes("incoming/a.csv") == b"data"


def test_move_leaves_a_source_overwritten_after_the_copy_in_place(client: Any) -> None:
    def copy_then_producer_reuploads(copy_source: Any, bucket: str, key: str, **kwargs: Any) -> None:
        client.copy(copy_source, bucket, key, **kwargs)
        client.put_object(Bucket=BUCKET, Key="incoming/a.csv", Body=b"newer version")

    store = S3Store(cast(Any, Spy(client, copy=copy_then_producer_reuploads)), BUCKET)
    client.put_object(Bucket=BUCKET, Key="incoming/a.csv", Body=b"first")
    store.move("incoming/a.csv", "archive/a.csv")
    assert store.get_bytes("archive/a.csv") == b"first"
    assert store.get_bytes("incoming/a.csv") == b"newer version"  # not deleted: its own event will process it


def test_move_refuses_a_source_that_changed_since_it_was_read(store: S3Store) -> None:
    store.put_bytes("incoming/a.csv", b"v1")
    processed = store.head("incoming/a.csv").etag
    store.put_bytes("incoming/a.csv", b"v2")
    with pytest.raises(AwsError, match="changed"):
        store.move("incoming/a.csv", "archive/a.csv", etag=processed)
    assert store.get_bytes("incoming/a.csv") == b"v2"
    assert not store.exists("archive/a.csv")


def test_retried_move_after_source_deletion_succeeds(store: S3Store) -> None:
    store.put_bytes("incoming/a.csv", b"data")
    store.move("incoming/a.csv", "archive/a.csv")
    assert store.move("incoming/a.csv", "archive/a.csv").size == 4


def test_move_of_a_missing_source_without_destination_is_not_found(store: S3Store) -> None:
    with pytest.raises(NotFound):
        store.move("incoming/none.csv", "archive/none.csv")


def test_uri_helpers() -> None:
    assert split_uri("s3://bucket/incoming/orders/a.csv") == ("bucket", "incoming/orders/a.csv")
    assert split_uri("s3://bucket") == ("bucket", "")
    assert join_uri("b", "k/x") == "s3://b/k/x"
    assert is_s3_uri("s3://b/k") and not is_s3_uri("/tmp/k")
    for bad in ("/local/file.csv", "s3:///key", "http://b/k"):
        with pytest.raises(ConfigError):
            split_uri(bad)


def test_staging_cache_never_serves_another_stacks_object_under_the_same_key(tmp_path: Path) -> None:
    # Two stacks in turn on one machine share the work directory; the second writes other bytes under the same keys.
    from moto import mock_aws

    from processor.store import S3StagingStore

    cache = tmp_path / "staging-cache"
    seen = []
    for content in (b"first stack's state", b"second stack's state"):
        with mock_aws():
            client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
            client.create_bucket(Bucket=BUCKET)
            staging = S3StagingStore(S3Store(client, BUCKET), "staging", cache)
            staging.put_bytes("state/aggregates/daily-1.parquet", content)
            seen.append(staging.local_path("state/aggregates/daily-1.parquet").read_bytes())
            with staging.open("state/aggregates/daily-1.parquet") as f:
                seen.append(f.read())
    assert seen == [b"first stack's state"] * 2 + [b"second stack's state"] * 2
    assert len(list(cache.rglob("daily-1.parquet*"))) == 1  # the first stack's copy is gone, not kept beside


def test_staging_cache_leaves_another_tasks_download_of_the_same_key_alone(tmp_path: Path) -> None:
    # Tasks sharing one cache (the embedded stack's) read the same objects at once: the parts of a fanned-out merge.
    from moto import mock_aws

    from processor.store import S3StagingStore

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
        client.create_bucket(Bucket=BUCKET)
        staging = S3StagingStore(S3Store(client, BUCKET), "staging", tmp_path / "cache")
        staging.put_bytes("state/plan.json", b"v1")
        first = staging.local_path("state/plan.json")
        # another task's download, not yet renamed (boto3 writes it under a name of its own first)
        in_progress = first.with_name(first.name + ".0123abcd.part.1BcA5c5A")
        in_progress.write_bytes(b"v")
        first.unlink()  # as if this task had looked before the other one finished
        assert staging.local_path("state/plan.json").read_bytes() == b"v1"
        assert in_progress.exists()
        staging.put_bytes("state/plan.json", b"v2")  # a new version: the old copy goes, the download stays
        assert staging.local_path("state/plan.json").read_bytes() == b"v2"
        assert not first.exists() and in_progress.exists()


def test_keys_are_url_encoded_as_s3_events_write_them_and_decoded_back() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    from processor.aws.s3 import event_key, key_from_event

    assert event_key("incoming/orders/red flower.csv") == "incoming/orders/red+flower.csv"
    assert event_key("a+b=c:d é~.csv") == "a%2Bb%3Dc%3Ad+%C3%A9%7E.csv"

    @given(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=60))
    def roundtrip(key: str) -> None:
        assert key_from_event(event_key(key)) == key

    roundtrip()


def test_order_ranges_of_a_big_bucket_come_from_s3_footers_as_from_local_files(
    store: S3Store, tmp_path: Path, write_csv: WriteCsv
) -> None:
    """The merge reads the staged files' row group statistics through ranged reads on S3 (no download): the same
    cuts as from the same files on disk."""
    orders = [order(i, 100 + i % 5, "2025-03-01T08:00:00") for i in range(1, 61)]
    items = [item(i, 1 + i % 60, 100 + (1 + i % 60) % 5, 1, "2.50") for i in range(1, 121)]
    files = [write_csv("orders.csv", orders), write_csv("order_items.csv", items)]
    local = LocalStore(tmp_path / "local")
    stage_local(files, local, Settings.load(env={}, buckets=1, work_dir=tmp_path / "work"), tmp_path / "work")
    remote = S3StagingStore(store, "staging", tmp_path / "cache")
    for key in local.list_keys(""):
        remote.put_file(local.local_path(key), key)
    segments = committed_segments(local)
    expected = bucket_steps(local, segments, bucket_load(segments), rows_per_pass=12)
    assert len(expected) == 15
    assert bucket_steps(remote, committed_segments(remote), bucket_load(segments), rows_per_pass=12) == expected
    assert not any((tmp_path / "cache").rglob("*.parquet"))  # footers read by range, nothing downloaded
