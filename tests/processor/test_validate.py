"""Every row-level and file-level validation rule of SPEC section 2, on small case files."""

from __future__ import annotations

import gzip
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor import validate
from processor.errors import FileRejected, Reason
from processor.ingest import IngestOutput, bucket_row_groups, ingest, open_local
from processor.schema import BUCKET, MONEY_DTYPE, ORDER_ITEMS, ORDERS, PRODUCTS, STATUSES, Dataset, detect_dataset
from processor.validate import check_chunk, parse_timestamps

CASES = Path(__file__).parent.parent / "cases" / "validation"


def run(path: Path, dataset: Dataset, tmp_path: Path, share: float = 1.0, chunk_bytes: int = 1 << 20) -> IngestOutput:
    """Validate a case file, staging whole typed rows (``facts=False``, as a part of a split file does) so the tests
    can read the typed values; what the default staging keeps of them is tested in test_staged_facts.py."""
    with open_local(path) as stream:
        return ingest(
            stream, dataset, tmp_path / "work", buckets=4, chunk_bytes=chunk_bytes, max_invalid_share=share, facts=False
        )


def rejects_of(out: IngestOutput) -> dict[int, tuple[str, str | None]]:
    df = pl.read_csv(out.rejects, infer_schema=False)
    return {int(r["_line"]): (r["_reason"], r["_column"]) for r in df.iter_rows(named=True)}


def test_each_order_rule_rejects_its_row_with_line_reason_and_column(tmp_path: Path) -> None:
    out = run(CASES / "orders_rules.csv", ORDERS, tmp_path)
    assert rejects_of(out) == {
        3: ("missing_required", "order_id"),
        4: ("bad_type", "user_id"),
        5: ("unknown_status", "status"),
        6: ("bad_quantity", "num_of_item"),
        7: ("timestamp_order", "shipped_at"),
        8: ("bad_type", "created_at"),  # February 30th
        11: ("duplicate_key", "order_id"),  # repeats line 2
        12: ("missing_required", "num_of_item"),
    }
    assert out.rows == 11
    assert out.valid_rows == 3
    assert out.rejects_by_reason["duplicate_key"] == 1


def test_valid_rows_are_typed_status_lowercased_and_timestamps_in_utc(tmp_path: Path) -> None:
    out = run(CASES / "orders_rules.csv", ORDERS, tmp_path)
    staged = pl.read_parquet(out.segment).sort("order_id")
    assert staged.get_column("order_id").to_list() == [1, 8, 9]
    assert staged.get_column("status").to_list() == ["complete", "returned", "complete"]
    created = staged.get_column("created_at").to_list()
    assert created[1] == datetime(2025, 3, 1, 10, 0, 0, 250000, tzinfo=UTC)  # space separator, fraction
    assert created[2] == datetime(2025, 3, 2, 4, 30, tzinfo=UTC)  # -05:00 converted: next UTC day
    assert staged.get_column("returned_at").to_list()[1] == datetime(2025, 3, 4, tzinfo=UTC)  # Z suffix
    assert staged.get_column("_line").to_list() == [2, 9, 10]


def test_money_rules_negative_precision_and_type(tmp_path: Path) -> None:
    out = run(CASES / "items_money.csv", ORDER_ITEMS, tmp_path)
    assert rejects_of(out) == {
        3: ("negative_money", "sale_price"),
        4: ("money_precision", "sale_price"),
        6: ("bad_type", "sale_price"),
        8: ("timestamp_order", "returned_at"),
    }
    prices = pl.read_parquet(out.segment).sort("id").get_column("sale_price").to_list()
    assert [str(p) for p in prices] == ["12.34", "1.50", "7.00"]  # 1.500 has only zeros past 2 decimals


MONEY_TEXT = st.one_of(
    st.from_regex(r"-?[0-9]{0,4}(\.[0-9]{0,5})?([eE][0-9])?", fullmatch=True),
    st.text(alphabet=st.sampled_from(["1", "0", ".", "e", "\n", "\u00e9", "\u20ac", "-"]), max_size=8),
    st.text(max_size=8),
)


@given(st.lists(MONEY_TEXT, min_size=1, max_size=30), st.integers(0, 40))
def test_money_checked_by_a_prefilter_is_judged_as_by_the_exact_checks(values: list[str], plain: int) -> None:
    # Every value the exact checks would flag (an exponent, more than two bytes after the first dot) is among the
    # prefilter's suspects, so a chunk of plain prices with such values mixed in gets the same verdicts.
    frame = pl.DataFrame({"p": values})
    c = pl.col("p")
    flagged = frame.select(validate._exponent(c) | validate._long_fraction(c)).to_series()
    suspect = frame.select(c.str.contains(validate._MONEY_SUSPECT)).to_series()
    assert not (flagged & ~suspect).any()
    n = len(values) + plain
    prices = ["12.34"] * plain + values
    raw = pl.DataFrame(
        {
            "id": [str(i) for i in range(n)],
            "order_id": ["1"] * n,
            "user_id": ["1"] * n,
            "product_id": ["1"] * n,
            "status": ["complete"] * n,
            "created_at": ["2025-03-01T00:00:00"] * n,
            "shipped_at": pl.Series([None] * n, dtype=pl.String),
            "delivered_at": pl.Series([None] * n, dtype=pl.String),
            "returned_at": pl.Series([None] * n, dtype=pl.String),
            "sale_price": prices,
            "_line": list(range(2, n + 2)),
        }
    )
    _, rejected = check_chunk(raw, ORDER_ITEMS)
    reasons = dict(zip(rejected.get_column("_line").to_list(), rejected.get_column("_reason").to_list(), strict=True))
    for line, text in enumerate(prices, start=2):
        exact = pl.DataFrame({"p": [text]}).select(
            e=validate._exponent(c), long=validate._long_fraction(c), t=c.cast(MONEY_DTYPE, strict=False)
        )
        e, long, t = exact.row(0)
        if e or t is None:
            assert reasons.get(line) == "bad_type", text
        elif t < 0:
            assert reasons.get(line) == "negative_money", text
        elif long and not re.search(r"\.\d{2}0+$", text):
            assert reasons.get(line) == "money_precision", text
        else:
            assert line not in reasons, text


def test_rejected_rows_keep_their_raw_values(tmp_path: Path) -> None:
    out = run(CASES / "items_money.csv", ORDER_ITEMS, tmp_path)
    df = pl.read_csv(out.rejects, infer_schema=False)
    assert df.filter(pl.col("_line") == "6").get_column("sale_price").item() == "twelve"


def test_duplicate_key_is_found_across_chunks(tmp_path: Path) -> None:
    out = run(CASES / "orders_rules.csv", ORDERS, tmp_path, chunk_bytes=100)  # a few rows per chunk
    assert rejects_of(out)[11] == ("duplicate_key", "order_id")
    assert out.valid_rows == 3


def test_gzip_file_is_read_like_plain_csv(tmp_path: Path) -> None:
    gz = tmp_path / "orders_rules.csv.gz"
    with (CASES / "orders_rules.csv").open("rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    out = run(gz, ORDERS, tmp_path)
    assert out.valid_rows == 3 and out.rows == 11


def test_corrupt_gzip_rejects_the_file_as_unreadable(tmp_path: Path) -> None:
    gz = tmp_path / "orders.csv.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(FileRejected) as e:
        run(gz, ORDERS, tmp_path)
    assert e.value.reason is Reason.UNREADABLE


def test_missing_required_column_rejects_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileRejected) as e:
        run(CASES / "orders_missing_user.csv", ORDERS, tmp_path)
    assert e.value.reason is Reason.MISSING_COLUMN
    assert "user_id" in e.value.message


def test_header_without_rows_rejects_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileRejected) as e:
        run(CASES / "products_empty.csv", PRODUCTS, tmp_path)
    assert e.value.reason is Reason.EMPTY_FILE


def test_zero_byte_file_is_empty(tmp_path: Path) -> None:
    p = tmp_path / "products.csv"
    p.write_bytes(b"")
    with pytest.raises(FileRejected) as e:
        run(p, PRODUCTS, tmp_path)
    assert e.value.reason is Reason.EMPTY_FILE


def test_invalid_utf8_rejects_the_row_as_bad_encoding_with_its_bytes_escaped(tmp_path: Path) -> None:
    out = run(CASES / "products_bad_utf8.csv", PRODUCTS, tmp_path)
    assert rejects_of(out) == {2: ("bad_encoding", None)}
    raw = pl.read_csv(out.rejects, infer_schema=False).get_column("_raw").item()
    assert raw == "1,A,1,Books,\\xff\\xfe,B,2,D"


def test_too_many_invalid_rows_reject_the_file_with_counts(tmp_path: Path) -> None:
    with pytest.raises(FileRejected) as e:
        run(CASES / "orders_rules.csv", ORDERS, tmp_path, share=0.05)
    assert e.value.reason is Reason.TOO_MANY_INVALID
    assert e.value.context["rows"] == 11
    assert e.value.context["rejects_by_reason"]["bad_type"] == 2


def test_invalid_share_at_the_limit_is_accepted(tmp_path: Path) -> None:
    out = run(CASES / "orders_rules.csv", ORDERS, tmp_path, share=8 / 11)
    assert out.valid_rows == 3


def test_optional_columns_may_be_absent_and_extra_columns_warn(tmp_path: Path) -> None:
    out = run(CASES / "orders_minimal.csv", ORDERS, tmp_path)
    assert out.valid_rows == 1
    staged = pl.read_parquet(out.segment)
    assert staged.get_column("returned_at").null_count() == 1
    extra = run(CASES / "orders_extra_column.csv", ORDERS, tmp_path / "x")
    assert extra.warnings == ["extra columns ignored: coupon"]


def test_column_order_does_not_matter(tmp_path: Path) -> None:
    p = tmp_path / "orders.csv"
    p.write_text("num_of_item,created_at,status,user_id,order_id\n2,2025-03-01T00:00:00,SHIPPED,7,42\n")
    staged = pl.read_parquet(run(p, ORDERS, tmp_path).segment)
    assert staged.select("order_id", "user_id", "status", "num_of_item").row(0) == (42, 7, "shipped", 2)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("incoming/orders/2025/03/export_part1.csv", "orders"),
        ("s3://bucket/incoming/order_items/x.csv", "order_items"),
        ("incoming/order_items_part3.csv", "order_items"),
        ("/data/orders_part1.csv.gz", "orders"),
        ("products.csv", "products"),
        ("incoming/misc/orders.csv", "orders"),
        ("incoming/customers.csv", None),
    ],
)
def test_dataset_comes_from_the_path_then_the_longest_file_name(path: str, expected: str | None) -> None:
    found = detect_dataset(path)
    assert (found.name if found else None) == expected


def test_timestamp_fallback_only_changes_rows_the_fast_path_missed() -> None:
    raw = pl.Series(["2025-03-01T10:00:00", "2025-03-01 10:00:00", "2025-03-01T10:00:00+01:00", "nope", None])
    parsed = parse_timestamps(raw).to_list()
    assert parsed[0] == parsed[1] == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert parsed[2] == datetime(2025, 3, 1, 9, tzinfo=UTC)
    assert parsed[3] is None and parsed[4] is None


def test_a_row_gets_the_first_reason_in_rule_order() -> None:
    raw = pl.DataFrame(
        {
            "order_id": ["x"],
            "user_id": [None],
            "status": ["lost"],
            "created_at": ["2025-03-01T00:00:00"],
            "returned_at": [None],
            "shipped_at": [None],
            "delivered_at": [None],
            "num_of_item": ["0"],
            "_line": [2],
        },
        schema_overrides={c: pl.String for c in ("user_id", "returned_at", "shipped_at", "delivered_at")},
    )
    valid, rejected = check_chunk(raw, ORDERS)
    assert valid.is_empty()
    assert rejected.select("_reason", "_column").row(0) == ("missing_required", "user_id")


@given(
    st.lists(
        st.one_of(
            st.sampled_from(STATUSES),
            st.sampled_from(STATUSES).map(str.upper),
            st.sampled_from(["ship", "shipped ", "returnedx", "", "lost", "complete\u0301"]),
            st.text(max_size=12),
            st.none(),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_a_status_is_known_exactly_when_its_lowercase_form_is_in_the_contract(statuses: list[str | None]) -> None:
    n = len(statuses)
    text = {c: pl.Series(c, [None] * n, dtype=pl.String) for c in ("returned_at", "shipped_at", "delivered_at")}
    raw = pl.DataFrame(
        {
            "order_id": [str(i) for i in range(n)],
            "user_id": ["1"] * n,
            "status": pl.Series(statuses, dtype=pl.String),
            "created_at": ["2025-03-01T00:00:00"] * n,
            **text,
            "num_of_item": ["1"] * n,
            "_line": list(range(2, n + 2)),
        }
    )
    valid, rejected = check_chunk(raw, ORDERS)
    reasons = dict(zip(rejected.get_column("_line").to_list(), rejected.get_column("_reason").to_list(), strict=True))
    for line, status in enumerate(statuses, start=2):
        if status is None:  # the reader reads an empty field as null
            assert reasons[line] == "missing_required"
        elif status.lower() in STATUSES:
            assert line not in reasons
        else:
            assert reasons[line] == "unknown_status"
    assert set(valid.get_column("status").to_list()) == {s.lower() for s in statuses if s and s.lower() in STATUSES}


ORDERS_HEADER = "order_id,user_id,status,created_at,num_of_item\n"


def _order_rows(n: int) -> str:
    return "".join(f"{i},{i},complete,2025-03-01T00:00:00,1\n" for i in range(1, n + 1))


def test_header_names_match_case_insensitively_and_trimmed(tmp_path: Path) -> None:
    p = tmp_path / "orders.csv"
    p.write_text(
        " ORDER_ID ,User_Id,STATUS,Created_At,Returned_At,NUM_OF_ITEM\n"
        "1,2,returned,2025-03-01T00:00:00,2025-03-02T00:00:00,1\n"
    )
    staged = pl.read_parquet(run(p, ORDERS, tmp_path).segment)
    assert staged.select("order_id", "user_id", "num_of_item").row(0) == (1, 2, 1)
    assert staged.get_column("returned_at").to_list() == [datetime(2025, 3, 2, tzinfo=UTC)]  # not ignored


def test_a_name_repeated_in_another_case_rejects_the_file_naming_it(tmp_path: Path) -> None:
    p = tmp_path / "orders.csv"
    p.write_text("order_id,user_id,status,created_at,num_of_item, Order_ID\n1,2,complete,2025-03-01T00:00:00,1,1\n")
    with pytest.raises(FileRejected) as e:
        run(p, ORDERS, tmp_path)
    assert e.value.reason is Reason.DUPLICATE_COLUMN
    assert e.value.message.endswith("order_id (as 'order_id', 'Order_ID')")
    assert e.value.context["columns"] == ["order_id"]


def test_blank_lines_are_skipped_and_not_counted(tmp_path: Path) -> None:
    p = tmp_path / "orders.csv"
    rows = _order_rows(10).splitlines(keepends=True)
    rows[6] = "7,7,lost,2025-03-01T00:00:00,1\n"
    p.write_text(ORDERS_HEADER + "".join(rows[:5]) + "\n  \n" + "".join(rows[5:]) + "\n")
    out = run(p, ORDERS, tmp_path)
    assert out.rows == 10
    assert rejects_of(out) == {10: ("unknown_status", "status")}  # its true line: two blank lines before it


def test_trailing_blank_line_does_not_tip_the_invalid_share(tmp_path: Path) -> None:
    p = tmp_path / "orders.csv"
    p.write_text(ORDERS_HEADER + _order_rows(10) + "\n")
    out = run(p, ORDERS, tmp_path, share=0.05)
    assert (out.rows, out.valid_rows) == (10, 10)


def test_too_few_and_too_many_fields_are_the_same_row_level_reject(tmp_path: Path) -> None:
    p = tmp_path / "orders.csv"
    rows = _order_rows(40).splitlines(keepends=True)
    rows[9] = "10,10,complete\n"  # line 11
    rows[19] = "20,20,complete,2025-03-01T00:00:00,1,extra\n"  # line 21
    p.write_text(ORDERS_HEADER + "".join(rows))
    out = run(p, ORDERS, tmp_path, share=0.05)
    assert rejects_of(out) == {11: ("malformed_row", None), 21: ("malformed_row", None)}
    df = pl.read_csv(out.rejects, infer_schema=False)
    assert df.columns[-1] == "_raw" and df.columns[:3] == ["_line", "_reason", "_column"]
    assert df.get_column("_raw").to_list() == ["10,10,complete", "20,20,complete,2025-03-01T00:00:00,1,extra"]
    assert df.get_column("order_id").null_count() == 2  # no column values: the record could not be split


def test_ordinary_rejects_keep_values_by_column_and_no_raw_text(tmp_path: Path) -> None:
    out = run(CASES / "items_money.csv", ORDER_ITEMS, tmp_path)
    df = pl.read_csv(out.rejects, infer_schema=False)
    assert df.get_column("_raw").null_count() == df.height


def test_staged_row_groups_each_hold_one_bucket_so_a_merge_step_decodes_only_its_own(tmp_path: Path) -> None:
    lines = ["order_id,user_id,status,created_at,returned_at,shipped_at,delivered_at,num_of_item"]
    lines += [f"{i},{i % 97},complete,2025-03-01T10:00:00,,,,1" for i in range(1, 3001)]
    path = tmp_path / "orders.csv"
    path.write_text("\n".join(lines) + "\n")
    out = run(path, ORDERS, tmp_path, chunk_bytes=20_000)  # several chunks, each sorted by bucket
    source = pq.ParquetFile(out.segment)
    # About 7 chunks, written 4 at a time: a bucket's rows of the chunks written together share a row group, so
    # at most two writes of 4 buckets (one group per bucket of each chunk would give 28).
    assert 4 < source.metadata.num_row_groups <= 8
    for g in range(source.metadata.num_row_groups):
        buckets = source.read_row_group(g, columns=[BUCKET]).column(0).to_numpy()
        assert buckets.min() == buckets.max(), f"row group {g} mixes buckets {sorted(set(buckets.tolist()))}"
    staged = pl.read_parquet(out.segment)
    assert sorted(staged.get_column("order_id").to_list()) == list(range(1, 3001))
    assert (staged.get_column(BUCKET) == staged.get_column("order_id") % 4).all()


def test_staged_numbers_are_delta_encoded_uncompressed_and_read_back_exactly(tmp_path: Path) -> None:
    lines = ["id,order_id,user_id,product_id,status,created_at,shipped_at,delivered_at,returned_at,sale_price"]
    prices = ["0.01", "12.5", "99999999.99", "7", "0"]
    lines += [
        f"{i},{i // 2 + 1},{i % 13},{i % 7},shipped,2025-03-01T10:00:{i % 60:02d},,,,{prices[i % 5]}"
        for i in range(1, 2001)
    ]
    path = tmp_path / "items.csv"
    path.write_text("\n".join(lines) + "\n")
    out = run(path, ORDER_ITEMS, tmp_path, chunk_bytes=20_000)
    meta = pq.ParquetFile(out.segment).metadata
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            assert col.compression == "UNCOMPRESSED", col.path_in_schema
            if col.path_in_schema == "status":
                assert "RLE_DICTIONARY" in col.encodings
            else:  # ids, timestamps, line numbers, buckets, and money as integer cents
                assert "DELTA_BINARY_PACKED" in col.encodings, (col.path_in_schema, col.encodings)
    staged = pl.read_parquet(out.segment).sort("id")
    assert staged.schema["sale_price"] == pl.Decimal(18, 2)
    assert [str(v) for v in staged.get_column("sale_price").head(5)] == ["12.50", "99999999.99", "7.00", "0.00", "0.01"]
    assert staged.get_column("created_at").dt.second().head(3).to_list() == [1, 2, 3]


def test_row_groups_of_buckets_a_few_rows_apart_hold_two_buckets_each() -> None:
    # 32 buckets of 2,900-3,100 rows in 16 groups: a step reading one bucket decodes one other, never two.
    counts = np.random.default_rng(0).integers(2900, 3100, size=32)
    ends = np.cumsum(bucket_row_groups(counts, 16))
    assert np.searchsorted(np.cumsum(counts), ends).tolist() == list(range(1, 32, 2))


@given(st.lists(st.integers(0, 500), min_size=1, max_size=80), st.integers(1, 70))
def test_row_groups_end_on_bucket_boundaries_and_stay_few(counts: list[int], max_groups: int) -> None:
    arr = np.array(counts, dtype=np.int64)
    sizes = bucket_row_groups(arr, max_groups)
    assert sum(sizes) == arr.sum()
    ends = set(np.cumsum(arr[arr > 0]).tolist())
    assert set(np.cumsum(sizes).tolist()) <= ends  # no group ends inside a bucket
    assert len(sizes) <= max_groups
    assert all(s > 0 for s in sizes)
