"""Orders and items are staged as their facts (keys, date, cents, return flags, a digest of the typed row), not as
whole rows: the merge must see exactly what it would compute from the whole rows, and every rejected row must still
be reported with its values (processor.ingest: ``facts``)."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import IO, Any

import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import processor.pipeline as pipeline
from processor import kpis as K
from processor.ingest import FACTS, IngestOutput, ingest
from processor.pipeline import Validated, process_local
from processor.schema import ORDER_ITEMS, ORDERS, Dataset
from processor.settings import Settings

ITEM_HEADER = "id,order_id,user_id,product_id,status,created_at,shipped_at,delivered_at,returned_at,sale_price\n"
STAMPS = st.sampled_from(
    ["2025-03-01T10:00:00", "2025-03-01 23:30:00.25", "2025-03-02T08:00:00Z", "2025-03-01T23:00:00-05:00", ""]
)
PRICES = st.sampled_from(["10", "10.5", "0.99", "12.340", "7.00", "1e3", "-2", "abc", ""])
STATUSES = st.sampled_from(["complete", "Returned", "SHIPPED", "lost", ""])


def stage(data: bytes, dataset: Dataset, work: Path, chunk_bytes: int, facts: bool) -> IngestOutput:
    return ingest(
        io.BytesIO(data), dataset, work, buckets=4, chunk_bytes=chunk_bytes, max_invalid_share=1.0, facts=facts
    )


def merge_view(out: IngestOutput, dataset: Dataset) -> pl.DataFrame:
    """What the merge reads of a staged segment: its facts, with line and bucket, in line order."""
    staged = pl.scan_parquet(out.segment)
    facts = K.staged_facts(staged, FACTS[dataset.name](dataset.names))
    return staged.select(*facts, "_line", "_b").collect().sort("_line")


def rejects(out: IngestOutput) -> pl.DataFrame:
    return pl.read_csv(out.rejects, infer_schema=False).sort("_line", "_reason")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.tuples(st.integers(1, 400), st.integers(1, 50), STATUSES, STAMPS, STAMPS, STAMPS, STAMPS, PRICES),
        min_size=1,
        max_size=60,
    ),
    chunk_bytes=st.sampled_from([256, 1 << 20]),
    seed=st.randoms(use_true_random=False),
)
def test_staged_facts_are_what_the_merge_computes_from_whole_rows_and_rejects_are_the_same(
    tmp_path_factory: object, rows: list[tuple[int, int, str, str, str, str, str, str]], chunk_bytes: int,
    seed: random.Random,
) -> None:  # fmt: skip
    lines = [f"{i},{o},{o % 7 + 1},{o % 5 + 1},{s},{c},{sh},{d},{r},{p}" for i, o, s, c, sh, d, r, p in rows]
    seed.shuffle(lines)  # keys out of order: duplicates across chunks, reported from the rows kept whole
    data = (ITEM_HEADER + "".join(line + "\n" for line in lines)).encode()
    work = Path(str(tmp_path_factory.mktemp("facts")))  # type: ignore[attr-defined]
    facts = stage(data, ORDER_ITEMS, work / "facts", chunk_bytes, facts=True)
    whole = stage(data, ORDER_ITEMS, work / "whole", chunk_bytes, facts=False)
    assert (facts.rows, facts.valid_rows, facts.rejects_by_reason) == (
        whole.rows,
        whole.valid_rows,
        whole.rejects_by_reason,
    )
    assert merge_view(facts, ORDER_ITEMS).equals(merge_view(whole, ORDER_ITEMS))
    assert rejects(facts).equals(rejects(whole))
    assert set(pl.read_parquet_schema(facts.segment)) == {
        "order_id", "id", "user_id", "product_id", "cents", "i_ret", K.HASH, "_line", "_b",
    }  # fmt: skip


def test_a_duplicate_key_across_chunks_is_reported_with_all_of_its_values(tmp_path: Path) -> None:
    ordered = "".join(f"{k},{k},3,9,complete,2025-03-01T10:00:00,,,,5.00\n" for k in range(1, 200))
    late = "50,7,3,9,Returned,2025-03-02 10:00:00.5,2025-03-03T00:00:00Z,,2025-03-04T10:00:00+02:00,12.5\n"
    out = stage((ITEM_HEADER + ordered + late).encode(), ORDER_ITEMS, tmp_path, 512, facts=True)
    assert out.rejects_by_reason == {"duplicate_key": 1} and out.valid_rows == 199
    row = rejects(out).row(0, named=True)
    assert (row["_line"], row["_reason"], row["_column"]) == ("201", "duplicate_key", "id")
    assert (row["order_id"], row["status"], row["sale_price"]) == ("7", "returned", "12.50")
    assert row["created_at"] == "2025-03-02T10:00:00.500"
    assert row["shipped_at"] == "2025-03-03T00:00:00" and row["returned_at"] == "2025-03-04T08:00:00"
    assert (tmp_path / "segment.rows.parquet").exists()  # the chunks after the order broke, kept whole


def test_a_file_in_key_order_stages_facts_only(tmp_path: Path) -> None:
    data = "order_id,user_id,status,created_at,num_of_item\n"
    data += "".join(f"{k},{k % 9},complete,2025-03-01T10:00:00,1\n" for k in range(1, 2000))
    out = stage(data.encode(), ORDERS, tmp_path, 1 << 12, facts=True)
    assert out.valid_rows == 1999
    assert set(pl.read_parquet_schema(out.segment)) == {
        "order_id",
        "user_id",
        "order_date",
        "o_ret",
        K.HASH,
        "_line",
        "_b",
    }
    assert not (tmp_path / "segment.rows.parquet").exists()


def test_staged_columns_that_validation_never_leaves_null_are_required(tmp_path: Path) -> None:
    # Required Parquet columns carry no definition levels. Facts come from required columns only; a segment of
    # whole rows keeps the contract's optional columns optional, and their empty values read back as nulls.
    data = "order_id,user_id,status,created_at,shipped_at,num_of_item\n"
    data += "1,7,complete,2025-03-01T10:00:00,,1\n2,8,shipped,2025-03-01T11:00:00,2025-03-02T08:00:00,2\n"
    facts = stage(data.encode(), ORDERS, tmp_path / "facts", 1 << 12, facts=True)
    assert not any(f.nullable for f in pq.read_schema(facts.segment))
    whole = stage(data.encode(), ORDERS, tmp_path / "whole", 1 << 12, facts=False)
    optional = {f.name for f in pq.read_schema(whole.segment) if f.nullable}
    assert optional == {c.name for c in ORDERS.columns if not c.required}
    assert pl.read_parquet(whole.segment).sort("_line").get_column("shipped_at").null_count() == 1


def _shop(root: Path) -> list[Path]:
    root.mkdir()
    products = root / "products.csv"
    products.write_text("id,category,retail_price\n" + "".join(f"{p},cat{p % 2},{p}.00\n" for p in range(1, 5)))
    orders = root / "orders.csv"
    order_rows = (
        f"{o},{(o - 1) % 5 + 1},complete,2025-03-0{o % 3 + 1}T09:00:00,{'2025-03-09T00:00:00' if o % 7 == 0 else ''},3"
        for o in range(1, 101)
    )
    orders.write_text(
        "order_id,user_id,status,created_at,returned_at,num_of_item\n" + "".join(r + "\n" for r in order_rows)
    )
    items = root / "order_items.csv"
    item_rows = (
        f"{i},{i // 3 + 1},{(i // 3) % 5 + 1},{i % 4 + 1},{'returned' if i % 11 == 0 else 'complete'},"
        f"2025-03-0{i % 3 + 1}T10:00:00,,,,{i % 17}.{i % 100:02d}"
        for i in range(1, 300)
    )
    items.write_text(ITEM_HEADER + "".join(r + "\n" for r in item_rows))
    return [products, orders, items]


def test_a_merge_of_facts_equals_a_merge_of_whole_rows_alone_or_mixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segments staged as whole rows (by a part of a split file, or before facts existed) merge to the same KPIs
    and the same keyed digests as facts, alone or mixed in one delivery."""
    files = _shop(tmp_path / "shop")
    config = Settings.load(env={}, work_dir=tmp_path / "work")
    original = pipeline.validate_stream

    def merged(staging: str, whole: set[str]) -> tuple[object, ...]:
        def validate(stream: IO[bytes], **kwargs: Any) -> Validated:
            return original(stream, **{**kwargs, "facts": Path(kwargs["source"]).name not in whole})

        monkeypatch.setattr(pipeline, "validate_stream", validate)
        run = process_local(files, tmp_path / staging, config)
        keyed = tmp_path / staging / "state"
        digests = {
            table: sorted(pl.scan_parquet(keyed / "**" / f"{table}-*.parquet").select(K.HASH).collect().to_series())
            for table in ("orders", "items")
        }
        return run.daily, run.category, run.merge.state_rows, digests

    facts = merged("facts", set())
    assert merged("whole", {"orders.csv", "order_items.csv"}) == facts
    assert merged("mixed", {"order_items.csv"}) == facts
