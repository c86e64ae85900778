"""The headless Chromium helper (tests/browser.py) on tiny pages: it sees script errors, it can tell
escaped markup from live markup, and its screenshots cover the whole page."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from browser import chromium_available, open_page, require_chromium

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def chromium() -> None:
    """Skip the test without a usable Chromium (fail it where TUTELAGE_REQUIRE_BROWSER=1)."""
    require_chromium()


def page(tmp_path: Path, body: str, name: str = "page.html") -> Path:
    path = tmp_path / name
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>t</title></head>"
        f"<body>{body}</body></html>",
        encoding="utf-8",
    )
    return path


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which always comes first."""
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_a_script_error_is_reported_and_a_clean_page_has_none(chromium, tmp_path):
    with open_page(page(tmp_path, "<script>throw new Error('boom-4242')</script>")) as broken:
        [error] = broken.errors()
        assert "boom-4242" in error["message"] and error["source"] == "javascript"
        assert broken.errors() == [error]  # kept across calls, although get_log drains
    with open_page(page(tmp_path, "<p>fine</p><script>console.log('ok')</script>")) as clean:
        assert clean.errors() == []
        assert (
            clean.js("return document.querySelector('p').textContent + arguments[0]", "!")
            == "fine!"
        )


@pytest.mark.parametrize(
    "markup, runs",
    [
        ('&lt;img src=x onerror="window.pwned=1"&gt;', False),
        ('<img src=x onerror="window.pwned=1">', True),
    ],
)
def test_escaped_markup_stays_text_and_live_markup_runs(chromium, tmp_path, markup, runs):
    with open_page(page(tmp_path, f"<div id=note>{markup}</div>")) as shown:
        # The missing image fails before the load event driver.get waits for; the short wait
        # only keeps a late onerror from passing unseen.
        pwned = shown.driver.execute_async_script(
            "const done = arguments[0]; setTimeout(() => done(window.pwned), 200);"
        )
        assert (pwned == 1) is runs
        text = shown.js("return document.getElementById('note').textContent")
        assert text.startswith("<img") is not runs
        # The failed load of the live image is itself a SEVERE console entry.
        assert bool(shown.errors()) is runs


def test_the_screenshot_covers_the_whole_page(chromium, tmp_path):
    long_page = page(tmp_path, "<div style='height:2500px;background:teal'>tall</div>")
    with open_page(long_page, width=800, height=600) as shown:
        assert shown.js("return [innerWidth, innerHeight]") == [800, 600]
        shot = shown.screenshot(tmp_path / "shot.png")
    width, height = png_size(shot.read_bytes())
    assert 700 < width <= 800 and height >= 2500  # less a scrollbar; more than the viewport


def test_a_missing_browser_skips_or_under_ci_fails(monkeypatch):
    monkeypatch.setenv("TUTELAGE_CHROMIUM", "/nonexistent/chromium")
    assert "chromium not found at /nonexistent/chromium" in chromium_available()
    monkeypatch.delenv("TUTELAGE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium not found"):
        require_chromium()
    monkeypatch.setenv("TUTELAGE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="TUTELAGE_REQUIRE_BROWSER=1 but chromium"):
        require_chromium()
