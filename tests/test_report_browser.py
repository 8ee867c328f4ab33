"""The report in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright with the system executable) opens the page of a real match over mTLS.

It must load nothing (every request is routed here and any that is not ``file:``/``data:``
fails the test), log no console error, show the job summary's numbers, fit a 375 px phone
without horizontal scrolling, keep its heading structure and text alternatives, keep body
text at 4.5:1 contrast or better as the browser computes it, and print to A4.

``make test`` installs Chromium first (``make browser``); without it this module skips with
the reason, except under CI (``CI=true``), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from agency_a import cli as cli_a
from protocol.cli import authority as authority_cli
from tests.helpers.report_job import ReportedJob, reported_job

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]
#: A4 in PostScript points (210 x 297 mm), and what Chromium may round it to.
A4_POINTS = (595.28, 841.89)
A4_TOLERANCE = 2.0


def _unavailable() -> str:
    if not Path(CHROMIUM).is_file() or not os.access(CHROMIUM, os.X_OK):
        return (f"NO BROWSER: {CHROMIUM} is missing, so the report was NOT checked in a "
                "browser; run 'make browser' as root (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "NO PLAYWRIGHT: the 'playwright' package is not installed (pip install -e .[dev])"
    return ""


MISSING = _unavailable()
if MISSING:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must check the report in a browser: {MISSING}", pytrace=False)
    pytest.skip(MISSING, allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402

VIEWS = ("requester", "inspector")


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[ReportedJob, dict[str, Path]]]:
    """Both pages of a real job: ``agency-a report`` with the oversight verdict, and
    ``psi-authority oversight --html`` on the two exports."""
    with reported_job(tmp_path_factory.mktemp("report-browser")) as job:
        out = {view: job.tmp / f"{view}.html" for view in VIEWS}
        assert cli_a.main(job.report_args(out["requester"], "--purpose", "browser check",
                                          "--oversight", str(job.oversight))) == 0
        assert authority_cli.main([
            "oversight", "--custodian-export", str(job.custodian_export),
            "--requester-export", str(job.requester_export),
            "--custodian-key", str(job.custodian_pub), "--requester-key",
            str(job.requester_pub), "--html", str(out["inspector"])]) == 0
        yield job, out


@pytest.fixture(scope="module", params=VIEWS)
def report(request: pytest.FixtureRequest, reports: tuple[ReportedJob, dict[str, Path]]
           ) -> tuple[ReportedJob, Path]:
    """One of the two pages (every browser check runs on both)."""
    job, out = reports
    return job, out[request.param]


@pytest.fixture(scope="module")
def browser_page(report: tuple[ReportedJob, Path]) -> Iterator[tuple[Page, dict[str, Any]]]:
    """The page open in Chromium, with what it asked for and what it logged."""
    _, out = report
    seen: dict[str, Any] = {"outside": [], "requests": [], "console": [], "errors": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            def route(r: Any) -> None:
                url = r.request.url
                seen["requests"].append(url)
                if url.startswith(("file:", "data:")):
                    r.continue_()
                else:
                    seen["outside"].append(url)
                    r.abort()

            page.route("**/*", route)
            page.on("console", lambda m: seen["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.goto(out.as_uri(), wait_until="load")
            yield page, seen
        finally:
            browser.close()


def test_no_network_request_and_no_console_error(
        browser_page: tuple[Page, dict[str, Any]], report: tuple[ReportedJob, Path]) -> None:
    _, seen = browser_page
    assert seen["outside"] == []
    assert seen["requests"] == [report[1].as_uri()]  # the page itself, nothing else
    assert [m for m in seen["console"] if m[0] in ("error", "warning")] == []
    assert seen["errors"] == []


def test_key_numbers_equal_the_job_summary(browser_page: tuple[Page, dict[str, Any]],
                                           report: tuple[ReportedJob, Path]) -> None:
    page, _ = browser_page
    summary = report[0].summary
    if report[1].stem == "requester":
        expected = {key: summary[key] for key in (
            "queries_submitted", "queries_refused", "queries_accepted", "matches",
            "matched_queries", "disclosed_records", "elements_evaluated")}
    else:  # the inspector's counts are the ledgers', which the job's receipt states
        expected = {"custodian_evaluated": summary["elements_evaluated"],
                    "requester_evaluated": summary["elements_evaluated"],
                    "custodian_disclosed": summary["disclosed_records"],
                    "requester_disclosed": summary["disclosed_records"], "receipts": 1}
    for key, value in expected.items():
        shown = page.locator(f'[data-fact="{key}"]').inner_text()
        assert int(shown.replace(",", "")) == value, key
    assert page.locator('[data-fact="oversight"]').inner_text() == "AGREE"
    assert summary["receipt"]["transcript_hash"] in page.locator("#receipt").inner_text()


def test_accessible_structure(browser_page: tuple[Page, dict[str, Any]]) -> None:
    page, _ = browser_page
    levels = page.eval_on_selector_all("h1,h2,h3,h4,h5,h6",
                                       "els => els.map(e => Number(e.tagName[1]))")
    assert levels.count(1) == 1 and levels[0] == 1
    assert all(b <= a + 1 for a, b in pairwise(levels)), levels
    svgs = page.eval_on_selector_all("svg", """els => els.map(s => ({
        role: s.getAttribute('role'), label: s.getAttribute('aria-label'),
        title: !!s.querySelector(':scope > title'), desc: !!s.querySelector(':scope > desc'),
        width: s.getBoundingClientRect().width}))""")
    assert len(svgs) >= 2  # matches by rule, budget and cap (and refusals where known)
    for svg in svgs:
        assert svg["role"] == "img" and svg["label"] and svg["title"] and svg["desc"]
        assert svg["width"] > 100  # drawn, not collapsed
    assert page.evaluate("document.documentElement.lang") == "en"


def _luminance(rgb: tuple[float, ...]) -> float:
    lin = [c / 255 / 12.92 if c / 255 <= 0.03928 else ((c / 255 + 0.055) / 1.055) ** 2.4
           for c in rgb[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def test_text_contrast_as_the_browser_computes_it(
        browser_page: tuple[Page, dict[str, Any]]) -> None:
    """Every element with its own text, against the nearest opaque background behind it."""
    page, _ = browser_page
    pairs = page.evaluate("""() => {
        const out = [];
        for (const el of document.querySelectorAll('body *')) {
            if (el.closest('svg')) continue;
            const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
            if (!own) continue;
            let bg = 'rgba(0, 0, 0, 0)', up = el;
            while (up && /rgba\\(.*, 0\\)$|transparent/.test(bg)) {
                bg = getComputedStyle(up).backgroundColor; up = up.parentElement;
            }
            out.push([el.tagName, getComputedStyle(el).color, bg]);
        }
        return out;
    }""")
    assert len(pairs) > 50

    def rgb(css: str) -> tuple[float, ...]:
        return tuple(float(x) for x in re.findall(r"[\d.]+", css)[:3])

    worst = min(((max(_luminance(rgb(c)), _luminance(rgb(b))) + 0.05)
                 / (min(_luminance(rgb(c)), _luminance(rgb(b))) + 0.05), tag, c, b)
                for tag, c, b in pairs)
    assert worst[0] >= 4.5, worst


def test_phone_width_has_no_horizontal_overflow(
        browser_page: tuple[Page, dict[str, Any]], tmp_path: Path) -> None:
    page, _ = browser_page
    page.set_viewport_size({"width": 375, "height": 812})
    try:
        widths = page.evaluate("""() => [document.documentElement.scrollWidth,
            document.documentElement.clientWidth,
            Math.max(...[...document.querySelectorAll('main *')]
                .filter(e => !e.closest('.wide'))
                .map(e => e.getBoundingClientRect().right))]""")
        assert widths[0] <= widths[1] == 375, widths
        assert widths[2] <= 375.5, widths  # nothing sticks out (tables may scroll inside)
        shot = tmp_path / "phone.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})


def test_screenshot_and_a4_pdf(browser_page: tuple[Page, dict[str, Any]],
                               tmp_path: Path) -> None:
    page, _ = browser_page
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    pdf = tmp_path / "report.pdf"
    page.emulate_media(media="print")
    page.pdf(path=str(pdf), format="A4", print_background=True)
    page.emulate_media(media="screen")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and len(data) > 10_000
    boxes = {tuple(float(v) for v in m) for m in re.findall(
        rb"/MediaBox\s*\[\s*0\s+0\s+([\d.]+)\s+([\d.]+)\s*\]", data)}
    assert boxes, "no page size in the PDF"
    for width, height in boxes:
        assert abs(width - A4_POINTS[0]) <= A4_TOLERANCE, boxes
        assert abs(height - A4_POINTS[1]) <= A4_TOLERANCE, boxes
    pages = len(re.findall(rb"/Type\s*/Page[^s]", data))
    assert 2 <= pages <= 12, pages  # the whole report, on a handful of A4 pages
