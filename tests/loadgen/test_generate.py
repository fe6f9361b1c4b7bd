"""The load generator writes what the data contract declares, realistically, deterministically, with the faults
its manifest names (checked with the independent reference validator)."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

import loadgen.generate as gen
from loadgen.generate import GeneratedFiles, estimate_orders, generate, main
from processor import schema
from processor.errors import Reason
from processor.validate import ROW_RULES
from tests.reference import check_file, reference_rejects, reference_run

TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")
MONEY = re.compile(r"\d+\.\d{2}")
ORDERS = 3000


def read(path: Path) -> pl.DataFrame:
    """All values as text, exactly as written (bad rows must not break the read)."""
    return pl.read_csv(path, infer_schema=False)


def read_all(paths: tuple[Path, ...] | list[Path]) -> pl.DataFrame:
    return pl.concat([read(p).with_columns(pl.lit(p.name).alias("_file")) for p in paths])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> GeneratedFiles:
    return generate(tmp_path_factory.mktemp("gen"), orders=ORDERS, days=10, parts=3, seed=7, bad_rows=11, bad_file=True)


@pytest.fixture(scope="module")
def clean(data: GeneratedFiles) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """products, orders and items without the injected bad rows."""
    bad = {(b.path.name, b.key) for b in data.bad_rows}
    orders = read_all(data.orders).filter(
        ~pl.struct("_file", "order_id").map_elements(lambda s: (s["_file"], int(s["order_id"])) in bad, pl.Boolean)
    )
    items = read_all(data.items).filter(
        ~pl.struct("_file", "id").map_elements(lambda s: (s["_file"], int(s["id"])) in bad, pl.Boolean)
    )
    return read(data.products), orders, items


def test_files_have_the_declared_columns(data: GeneratedFiles) -> None:
    assert schema.PRODUCTS.names == gen.PRODUCT_COLUMNS
    assert schema.ORDERS.names == gen.ORDER_COLUMNS
    assert schema.ORDER_ITEMS.names == gen.ITEM_COLUMNS
    assert read(data.products).columns == list(schema.PRODUCTS.names)
    for p in data.orders:
        assert read(p).columns == list(schema.ORDERS.names)
        assert schema.detect_dataset(str(p)) is schema.ORDERS
    for p in data.items:
        assert read(p).columns == list(schema.ORDER_ITEMS.names)
        assert schema.detect_dataset(str(p)) is schema.ORDER_ITEMS


def test_paths_list_products_then_orders_then_items(data: GeneratedFiles) -> None:
    names = [p.name for p in data.paths]
    assert names == [
        "products.csv",
        "orders_part1.csv",
        "orders_part2.csv",
        "orders_part3.csv",
        "orders_part4.csv",  # the bad file
        "order_items_part1.csv",
        "order_items_part2.csv",
        "order_items_part3.csv",
    ]
    assert data.rows["orders"] == ORDERS
    assert data.rows["order_items"] == sum(read(p).height for p in data.items)
    assert data.csv_bytes == sum(p.stat().st_size for p in data.paths)


def test_ids_are_unique_across_parts(data: GeneratedFiles) -> None:
    orders, items = read_all(data.orders), read_all(data.items)
    assert orders["order_id"].n_unique() == orders.height == ORDERS
    assert items["id"].n_unique() == items.height
    assert read(data.products)["id"].n_unique() == 2000


def test_items_reference_existing_orders_and_products_of_the_same_user(
    data: GeneratedFiles, clean: tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]
) -> None:
    products, orders, items = clean
    joined = items.join(orders, on="order_id", how="left", suffix="_order")
    # Items of an order whose own row was corrupted have no clean order: that is the point of a bad order row.
    orphans = set(joined.filter(pl.col("user_id_order").is_null())["order_id"].cast(pl.Int64))
    assert orphans == {b.key for b in data.bad_rows if b.dataset == "orders"}
    joined = joined.drop_nulls("user_id_order")
    assert (joined["user_id"] == joined["user_id_order"]).all()
    assert items["product_id"].is_in(products["id"].implode()).all()
    counts = read_all(data.items).group_by("order_id").len()  # bad item rows included: they were generated
    with_counts = orders.join(counts, on="order_id")
    assert (with_counts["num_of_item"].cast(pl.Int64) == with_counts["len"]).all()
    assert with_counts["num_of_item"].cast(pl.Int64).is_between(1, 5).all()
    assert 1.8 < items.height / orders.height < 2.2


def test_values_are_well_formed_and_timestamps_follow_created_at(
    clean: tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame],
) -> None:
    products, orders, items = clean
    for frame, money in ((products, ("cost", "retail_price")), (items, ("sale_price",))):
        for c in money:
            assert frame[c].str.contains(f"^{MONEY.pattern}$").all()
    for frame in (orders, items):
        assert frame["created_at"].str.contains(f"^{TS.pattern}$").all()
        for later in ("shipped_at", "delivered_at", "returned_at"):
            present = frame.drop_nulls(later)
            assert present[later].str.contains(f"^{TS.pattern}$").all()
            assert (present[later] > present["created_at"]).all()  # ISO text sorts like time
    assert orders["created_at"].min() >= "2025-03-01T00:00:00"  # type: ignore[operator]
    assert orders["created_at"].max() < "2025-03-11T00:00:00"  # type: ignore[operator]
    assert orders["created_at"].str.slice(0, 10).n_unique() == 10
    joined = items.join(orders, on="order_id", suffix="_order")
    assert (joined["created_at"] >= joined["created_at_order"]).all()
    delay = joined["created_at"].str.to_datetime() - joined["created_at_order"].str.to_datetime()
    assert delay.max().total_seconds() < 300  # type: ignore[union-attr]


def test_statuses_have_plausible_shares(clean: tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]) -> None:
    _, orders, items = clean
    share = {k: v / orders.height for k, v in Counter(orders["status"].to_list()).items()}
    assert set(share) == set(schema.STATUSES)
    assert 0.07 < share["returned"] < 0.13
    assert 0.12 < share["cancelled"] < 0.18
    returned = orders.filter(pl.col("status") == "returned")
    assert returned["returned_at"].null_count() == 0
    never_shipped = orders.filter(pl.col("status").is_in(["processing", "cancelled"]))
    assert never_shipped["shipped_at"].null_count() == never_shipped.height
    joined = items.join(orders, on="order_id", suffix="_order")
    assert 0.9 < (joined["status"] == joined["status_order"]).mean() < 1.0  # type: ignore[operator]
    assert items.filter(pl.col("status") == "returned")["returned_at"].null_count() == 0
    same = joined.filter(pl.col("status") == pl.col("status_order"))
    for c in ("shipped_at", "delivered_at", "returned_at"):  # an item in its order's state has its timestamps
        assert same[c].eq_missing(same[f"{c}_order"]).all()
    kept = joined.filter((pl.col("status_order") == "returned") & (pl.col("status") != "returned"))
    assert kept.height > 0 and kept["returned_at"].null_count() == kept.height


def test_sale_price_is_near_the_retail_price(clean: tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]) -> None:
    products, _, items = clean
    joined = items.join(products, left_on="product_id", right_on="id")
    ratio = joined["sale_price"].cast(pl.Float64) / joined["retail_price"].cast(pl.Float64)
    assert ratio.is_between(0.59, 1.0).all()
    assert (ratio == 1.0).mean() > 0.6  # type: ignore[operator]


def test_rows_are_scattered_over_parts(clean: tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]) -> None:
    _, orders, items = clean
    days_per_part = orders.group_by("_file").agg(pl.col("created_at").str.slice(0, 10).n_unique())
    assert days_per_part["created_at"].min() == 10  # every part spans every day
    joined = items.join(orders, on="order_id", suffix="_order")
    other = (joined["_file"].str.replace("order_items_", "") != joined["_file_order"].str.replace("orders_", "")).mean()
    assert 0.5 < other < 0.8  # type: ignore[operator]  # with 3 parts, 2 items in 3 live elsewhere


def test_bad_rows_are_detected_by_the_reference_with_the_declared_reason(data: GeneratedFiles) -> None:
    assert len(data.bad_rows) == 11
    assert {b.reason for b in data.bad_rows} == set(ROW_RULES)  # every rule the validator judges a typed row by
    for path in [*data.orders, *data.items]:
        declared = [(b.line, str(b.reason)) for b in data.bad_rows if b.path == path]
        assert reference_rejects(path) == declared
    for b in data.bad_rows:
        line = b.path.read_text().splitlines()[b.line - 1]
        assert line.startswith(f"{b.key},")


def test_bad_file_is_rejected_whole_for_its_missing_column(data: GeneratedFiles) -> None:
    assert data.bad_file is not None and data.bad_file_reason == Reason.MISSING_COLUMN
    assert "user_id" not in read(data.bad_file).columns
    assert check_file(data.bad_file).reason == Reason.MISSING_COLUMN
    assert min(read(data.bad_file)["order_id"].cast(pl.Int64).to_list()) > ORDERS  # fresh ids: seen if accepted


def test_reference_accepts_every_other_file_and_only_items_of_bad_orders_wait(data: GeneratedFiles) -> None:
    run = reference_run(data.paths)
    assert [f.accepted for f in run.files] == [f.path != data.bad_file for f in run.files]
    bad_orders = {b.key for b in data.bad_rows if b.dataset == "orders"}
    assert {i["order_id"] for i in run.waiting} <= bad_orders
    assert run.user_mismatch == [] and run.conflicts == 0
    assert sum(d["total_orders"] for d in run.daily) == ORDERS - len(bad_orders)


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", orders=500, parts=2, seed=3, bad_rows=4)
    b = generate(tmp_path / "b", orders=500, parts=2, seed=3, bad_rows=4)
    c = generate(tmp_path / "c", orders=500, parts=2, seed=4, bad_rows=4)
    assert [p.read_bytes() for p in a.paths] == [p.read_bytes() for p in b.paths]
    assert [(x.line, x.reason) for x in a.bad_rows] == [(x.line, x.reason) for x in b.bad_rows]
    assert a.orders[0].read_bytes() != c.orders[0].read_bytes()


def test_parts_and_chunks_do_not_change_the_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = generate(tmp_path / "one", orders=1200, seed=5)
    monkeypatch.setattr(gen, "CHUNK_ORDERS", 1200)  # the value the data depends on, see CHUNK_ORDERS
    many = generate(tmp_path / "many", orders=1200, seed=5, parts=4)
    for a, b in ((one.orders, many.orders), (one.items, many.items)):
        assert read_all(a).drop("_file").sort(pl.all()).equals(read_all(b).drop("_file").sort(pl.all()))


def test_small_chunks_keep_ids_continuous_and_bad_rows_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gen, "CHUNK_ORDERS", 97)
    out = generate(tmp_path, orders=1000, parts=2, seed=1, bad_rows=22)
    orders, items = read_all(out.orders), read_all(out.items)
    assert sorted(orders["order_id"].cast(pl.Int64).to_list()) == list(range(1, 1001))
    assert sorted(items["id"].cast(pl.Int64).to_list()) == list(range(1, items.height + 1))
    for path in [*out.orders, *out.items]:
        assert reference_rejects(path) == [(b.line, str(b.reason)) for b in out.bad_rows if b.path == path]


def test_gzip_output_is_readable_and_holds_the_same_csv(tmp_path: Path) -> None:
    plain = generate(tmp_path / "plain", orders=400, seed=2, bad_file=True)
    zipped = generate(tmp_path / "zipped", orders=400, seed=2, bad_file=True, gzip=True)
    assert [p.name for p in zipped.paths] == [p.name + ".gz" for p in plain.paths]
    for p, z in zip(plain.paths, zipped.paths, strict=True):
        assert gzip.decompress(z.read_bytes()) == p.read_bytes()
    assert zipped.csv_bytes == plain.csv_bytes
    assert reference_run(zipped.paths).daily == reference_run(plain.paths).daily


def test_custom_categories_and_customers(tmp_path: Path) -> None:
    out = generate(tmp_path, orders=300, customers=7, categories=["Electronics", "Widgets"], products=50)
    products = read(out.products)
    assert set(products["category"]) == {"Electronics", "Widgets"}
    assert read_all(out.orders)["user_id"].cast(pl.Int64).is_between(1, 7).all()


def test_invalid_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, orders=0)
    with pytest.raises(ValueError):
        generate(tmp_path, orders=5, bad_rows=6)


def test_estimate_orders_reaches_about_the_requested_size(tmp_path: Path) -> None:
    orders = estimate_orders(0.004, sample_orders=2000)
    out = generate(tmp_path, orders=orders)
    assert 0.9 * 4e6 < out.csv_bytes < 1.1 * 4e6


def test_cli_writes_the_files_and_prints_a_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "manifest.json"
    args = [str(tmp_path / "out"), "--orders", "200", "--parts", "2", "--bad-rows", "3", "--bad-file", "--gzip"]
    code = main([*args, "--seed", "9", "--manifest", str(manifest), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads(manifest.read_text())
    assert len(summary["paths"]) == 1 + 3 + 2 and all(Path(p).exists() for p in summary["paths"])
    assert summary["rows"]["orders"] == 200 and len(summary["bad_rows"]) == 3
    assert summary["bad_file_reason"] == "missing_column"
    assert not any(p.name == "manifest.json" for p in (tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["--size-gb", "-1"],
        ["--size-gb", "0"],
        ["--orders", "0"],
        ["--orders", "5", "--days", "0"],
        ["--orders", "5", "--parts", "0"],
    ],
)
def test_a_size_or_count_below_one_is_refused_before_anything_is_written(
    tmp_path: Path, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "out"), *args])
    assert stop.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(SystemExit) as stop:
        main([str(target), "--orders", "5"])
    assert stop.value.code == 2
    assert f"out_dir: {target} is a file, not a folder" in capsys.readouterr().err
