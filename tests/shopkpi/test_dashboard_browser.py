"""The dashboard in a real browser: headless Chromium driven through chromedriver (both Debian packages) by
Selenium, against the embedded stack. A generated shop lands as producers would land it; the page must show the
figures the KPI store holds, change them when the range changes, and show a new file's KPIs without a reload.
The last test keeps a screenshot for docs/dashboard.md (docs/images/dashboard.png).

Skipped when Chromium, chromedriver or Selenium is missing, unless ``SHOPKPI_REQUIRE_BROWSER=1`` (CI sets it in
``.ci/run``): then it fails, so CI cannot pass without running it. Any error the page logs (a script error, a
Content-Security-Policy violation, a failed request) fails the test that caused it.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from loadgen.generate import generate
from orchestration import operations
from orchestration.local.stack import EmbeddedStack
from processor.model import CategoryKpi, OrderKpi, ratio
from processor.settings import Settings
from shopkpi import health
from shopkpi.dashboard import make_server, serving
from tests.builders import BIG_DAY
from tests.orchestration import test_embedded_stack as embedded

pytestmark = pytest.mark.slow

# The client bundle of the embedded stack, as tests/orchestration/test_embedded_stack.py makes it.
op = embedded.op

SCREENSHOT = Path(__file__).parents[2] / "docs" / "images" / "dashboard.png"
START = date(2031, 5, 1)  # the generated shop's first order date: nothing else in this stack uses 2031
DAYS = 60  # two 30-day periods: the cards compare the range with a full previous one
WIDTH = 1360
#: Longer than one poll (10 s) plus a merge on a loaded machine.
PAGE_WAIT_S = 120.0
#: Landing to outcome on a machine shared with other test runs (the embedded tests' 90 s is for their tiny files).
LAND_WAIT_S = 600.0
RELAXED = {"HeartbeatSeconds": 30, "ValidateTimeoutSeconds": 300, "StepTimeoutSeconds": 120, "MergeTimeoutSeconds": 300}


# --- the browser -------------------------------------------------------------------------------------------------
def _missing() -> list[str]:
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    return missing


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _missing()
    if missing:
        message = f"no {', '.join(missing)}: apt-get install chromium chromium-driver"
        if os.environ.get("SHOPKPI_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SHOPKPI_REQUIRE_BROWSER=1 but {message}")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WIDTH},1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(shutil.which("chromedriver"))))
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = PAGE_WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = condition()
        except Exception:  # an element between two redraws: look again
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"the page never showed {what}"
        time.sleep(0.25)


def open_page(browser: Any, url: str) -> None:
    browser.get(url)
    wait_until(lambda: browser.execute_script("return document.body.dataset.state") == "ready", "its first figures")


def page_errors(browser: Any) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def card(browser: Any, kpi: str) -> str:
    return str(browser.find_element("css selector", f'.card[data-kpi="{kpi}"] .value').text)


def cards(browser: Any) -> dict[str, str]:
    return {kpi: card(browser, kpi) for kpi in EXPECTED_CARDS}


def table(browser: Any, table_id: str) -> list[list[str]]:
    rows = browser.find_elements("css selector", f"#{table_id} tbody tr")
    return [[str(td.get_attribute("textContent")) for td in tr.find_elements("css selector", "td")] for tr in rows]


# --- what the store holds, as the page writes it -------------------------------------------------------------------
def money(cents: int) -> str:
    return f"${Decimal(cents) / 100:,.2f}"


EXPECTED_CARDS = (
    "total_revenue",
    "total_orders",
    "total_items_sold",
    "avg_order_value",
    "return_rate",
    "avg_daily_customers",
)


def expected_cards(days: list[OrderKpi], span_days: int) -> dict[str, str]:
    """The cards' text for these stored days, computed here from the store's exact components."""
    orders = sum(k.total_orders for k in days)
    cents = sum(k.revenue_cents for k in days)
    return {
        "total_revenue": money(cents),
        "total_orders": f"{orders:,}",
        "total_items_sold": f"{sum(k.total_items_sold for k in days):,}",
        "avg_order_value": f"${ratio(Decimal(cents) / 100, orders):,}",
        "return_rate": f"{ratio(sum(k.returned_orders for k in days), orders, 100)} %",
        "avg_daily_customers": f"{ratio(sum(k.unique_customers for k in days), span_days):,}",
    }


def expected_day(rows: list[CategoryKpi]) -> list[list[str]]:
    return sorted(
        [k.category, money(k.revenue_cents), f"${k.avg_order_value:,}", f"{k.avg_return_rate} %"] for k in rows
    )


def default_range(op: operations.Stack) -> tuple[str, str]:
    """The 30 days up to the newest stored date: the range the page opens on."""
    newest = date.fromisoformat(op.tables.daily()[-1].order_date)
    return (newest - timedelta(days=29)).isoformat(), newest.isoformat()


# --- the stack's data and the dashboard ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    """The embedded tests' stack, with heartbeats and timeouts that a machine loaded by other test runs keeps:
    this test is about the page, not about the workflow's failure paths."""
    s = EmbeddedStack(
        Settings.load(env={}, stack=f"skd{uuid.uuid4().hex[:8]}", work_dir=tmp_path_factory.mktemp("dash") / "work"),
        port=0,
        numbers={**embedded.NUMBERS, **RELAXED},
        task_env={"SHOPKPI_BUCKETS": "4"},
        pipe_window_s=embedded.PIPE_WINDOW_S,
    )
    try:
        s.start()
        yield s
    finally:
        s.stop()


def land(op: operations.Stack, paths: list[Path]) -> list[operations.Landed]:
    """Upload the files as producers would and wait until each has an outcome and the pipeline is idle."""
    landed = operations.ingest(op, paths)
    assert operations.wait(op, LAND_WAIT_S, landed, settle_s=embedded.SETTLE_S), "pipeline not idle"
    return landed


@pytest.fixture(scope="module")
def shop(op: operations.Stack, tmp_path_factory: pytest.TempPathFactory) -> list[operations.Landed]:
    """A generated shop of two months, with a few bad rows and one file rejected whole (for the health panel)."""
    folder = tmp_path_factory.mktemp("dashboard-shop")
    gen = generate(folder, orders=2400, days=DAYS, start=START, seed=2031, bad_rows=4, bad_file=True)
    return land(op, gen.paths)


@pytest.fixture(scope="module")
def url(op: operations.Stack, shop: list[operations.Landed]) -> Iterator[str]:
    server = make_server(
        "127.0.0.1",
        0,
        lambda f, t: operations.daily(op, f, t),
        lambda c, f, t: operations.category(op, c, f, t),
        lambda: health.snapshot(op),
    )
    with serving(server) as base:
        yield base + "/"


# --- the tests -------------------------------------------------------------------------------------------------------
def test_page_shows_the_kpis_dynamodb_holds_for_the_last_30_stored_days(
    browser: Any, url: str, op: operations.Stack
) -> None:
    open_page(browser, url)
    first, last = default_range(op)
    assert browser.find_element("id", "range-label").text == f"{first} – {last} (30 days)"
    stored = op.tables.daily(first, last)
    assert cards(browser) == expected_cards(stored, 30)
    # the daily table holds every stored day of the range; the chosen day (the newest) is marked
    assert [row[:3] for row in table(browser, "table-daily")] == [
        [k.order_date, money(k.revenue_cents), f"{k.total_orders:,}"] for k in stored
    ]
    marked = browser.find_elements("css selector", "#table-daily tr.selected td")
    assert marked[0].get_attribute("textContent") == last
    assert browser.find_element("id", "day").get_attribute("value") == last
    assert sorted(table(browser, "table-day")) == expected_day(op.tables.category(None, last, last))
    # the health panel lists the execution and the file rejected whole, with its reason
    shown = health.snapshot(op)
    assert [row[:2] for row in table(browser, "table-executions")] == [[e.name, e.status] for e in shown.executions]
    assert "SUCCEEDED" in {e.status for e in shown.executions}
    files = table(browser, "table-files")
    assert any(row[1] == "rejected" and "missing" in row[2] for row in files), files
    assert page_errors(browser) == []


def test_range_filter_and_day_pick_change_the_figures(browser: Any, url: str, op: operations.Stack) -> None:
    open_page(browser, url)
    day = (START + timedelta(days=3)).isoformat()
    week_end = (START + timedelta(days=9)).isoformat()
    browser.execute_script(
        "document.getElementById('from').value = arguments[0]; document.getElementById('to').value = arguments[1];",
        day,
        week_end,
    )
    browser.find_element("id", "apply").click()
    wait_until(lambda: browser.find_element("id", "range-label").text.startswith(f"{day} – {week_end}"), "the range")
    wait_until(lambda: cards(browser) == expected_cards(op.tables.daily(day, week_end), 7), "the range's figures")
    assert f"from={day}&to={week_end}" in browser.current_url  # a link to this view

    browser.execute_script(
        "const d = document.getElementById('day'); d.value = arguments[0]; d.dispatchEvent(new Event('change'));", day
    )
    expected = expected_day(op.tables.category(None, day, day))
    wait_until(lambda: sorted(table(browser, "table-day")) == expected, f"the categories of {day}")
    # sorting the breakdown by revenue (a click on its header) orders the rows by revenue, largest first
    header = browser.find_element("css selector", '#table-day th[data-key="daily_revenue"]')
    header.click()
    header.click()
    shown = [row[1] for row in table(browser, "table-day")]
    assert shown == [r[1] for r in sorted(expected, key=lambda r: -Decimal(r[1].strip("$").replace(",", "")))]
    assert header.get_attribute("aria-sort") == "descending"
    assert page_errors(browser) == []


def test_a_new_files_kpis_appear_without_a_reload(browser: Any, url: str, op: operations.Stack, tmp_path: Path) -> None:
    open_page(browser, url)
    browser.execute_script("window.sameDocument = true")
    before = cards(browser)
    late = embedded.small_shop(tmp_path, "dash", base=9_000_000, month=default_range(op)[1][:7])
    landed = land(op, late.paths)
    first, last = default_range(op)  # the page follows the newest date: a later one moves the range
    after = expected_cards(op.tables.daily(first, last), 30)
    assert after != before
    wait_until(lambda: cards(browser) == after, "the new file's figures")
    assert browser.execute_script("return window.sameDocument") is True  # polled, not reloaded
    records = [op.ledger.get_file(x.file_id) for x in landed]
    names = {r.execution for r in records if r is not None and r.execution}
    assert names
    wait_until(lambda: names & {row[0] for row in table(browser, "table-executions")}, "the new execution")
    assert page_errors(browser) == []
    save_screenshot(browser)


def test_a_total_beyond_float_precision_is_shown_digit_for_digit(browser: Any) -> None:
    with serving(make_server("127.0.0.1", 0, lambda f, t: [BIG_DAY], lambda c, f, t: [])) as base:
        open_page(browser, base + "/")
        shown = cards(browser)
    assert shown["total_revenue"] == "$10,000,000,000,000,050.05"  # a float would show ...048.00
    assert shown == expected_cards([BIG_DAY], 30)
    # this server has no health reader: its one 404 is the only error, the page asks no more
    assert [e.split(" - ")[0].rsplit("/", 1)[-1] for e in page_errors(browser)] == ["health"]


def save_screenshot(browser: Any) -> None:
    """The whole page at a desktop width, for docs/dashboard.md."""
    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    browser.set_window_size(WIDTH, height)
    time.sleep(0.5)  # the charts redraw on resize
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
