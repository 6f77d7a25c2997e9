"""The chat page at GET /, driven in a headless Chromium against a real server.

Skipped where there is no browser: Debian's chromium (`apt-get install chromium`, as .ci/run does) and
Playwright's Python package are both needed.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

CHROMIUM = shutil.which("/usr/bin/chromium") or shutil.which("chromium")
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
if sync_playwright is None or CHROMIUM is None:
    missing = " and ".join(
        name for name, ok in (("chromium", CHROMIUM), ("playwright", sync_playwright)) if not ok
    )
    pytest.skip(f"no browser to drive the chat page: {missing} not installed", allow_module_level=True)

import uvicorn  # noqa: E402

from tokensieve.server.app import create_app  # noqa: E402

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_url(llm):
    """A real server on a free port, in a thread of its own (Playwright's sync API needs no asyncio loop here)."""
    app = create_app(llm.with_options(kv_cache_bytes=256 * 1024**2), served_model_name="smollm2-135m")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def _number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def test_chat_page_streams_a_reply_and_shows_engine_stats(server_url):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page_errors = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(server_url + "/")
            page.wait_for_function("!/^(loading|model unavailable)/.test(document.getElementById('model').textContent)")
            assert page.text_content("#model") == "smollm2-135m"

            page.fill("#max-tokens", "48")
            page.fill("#input", "Write a long story about a dragon who learns to bake bread.")
            page.press("#input", "Enter")
            page.wait_for_selector("body[data-state=streaming]")

            # Read the reply and the stats while it streams, until the page says it is done.
            replies, kv_bytes = [], []
            deadline = time.monotonic() + 120
            while page.get_attribute("body", "data-state") == "streaming":
                assert time.monotonic() < deadline, "the reply did not finish in 120 s"
                text = page.text_content("#reply .content") or ""
                if text and (not replies or replies[-1] != text):
                    replies.append(text)
                kv_bytes.append(_number(page.get_attribute("#stat-kv", "data-value")))
                time.sleep(0.03)
            final = page.text_content("#reply .content")
            assert page.query_selector("#reply .error") is None, page.text_content("#reply .error")
            assert len(replies) >= 2, f"the reply did not grow while streaming: {replies}"
            assert all(final.startswith(r) for r in replies)
            assert len(final) > len(replies[0])

            tps = _number(page.get_attribute("#stat-tps", "data-value"))
            assert tps is not None and tps > 0, page.text_content("#stat-tps")
            assert any(b for b in kv_bytes if b), f"KV bytes in use never shown nonzero: {kv_bytes}"
            assert _number(page.get_attribute("#stat-prefix-hits", "data-value")) is not None
            assert _number(page.get_attribute("#stat-accepted", "data-value")) is not None

            # The conversation is kept: a second turn is sent with the first, and streams as well.
            page.fill("#input", "Now make it shorter.")
            page.click("#send")
            page.wait_for_function("document.body.dataset.state === 'done'"
                                   " && document.querySelectorAll('.msg.assistant').length === 2", timeout=120_000)
            assert page.query_selector("#reply .error") is None
            assert page.text_content("#reply .content")
            assert page.locator(".msg.user").count() == 2
            hits = _number(page.get_attribute("#stat-prefix-hits", "data-value"))
            assert hits and hits > 0, "the second turn's prompt starts with the first's: prefix-cache hits expected"

            # An error answer is shown to the user.
            page.fill("#max-tokens", "-1")
            page.fill("#input", "One more.")
            page.press("#input", "Enter")
            page.wait_for_selector("body[data-state=done] #reply .error")
            assert "max_tokens" in page.text_content("#reply .error")
            assert page_errors == []
        finally:
            browser.close()
