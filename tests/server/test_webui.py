"""The web chat page at `/`, driven in a real headless Chromium (Debian's `chromium`, through
Playwright, with the page's own Content-Security-Policy in force): pick the model, type a message, watch the reply stream in with its tokens/s, stop a
reply midway (which aborts the generation on the server). Skipped where no browser is installed.
"""

from __future__ import annotations

import shutil

import httpx
import pytest

from live import LiveServer

KEY = "page-key"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def live(tiny_model):
    srv = LiveServer(tiny_model("qwen3_moe", "f32", with_safetensors=False), "--api-key", KEY,
                     "--served-model-name", "tiny-chat", "--max_new_tokens", "400")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def page(live):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            pg = browser.new_page()
            pg.goto(live.url + "/")
            yield pg
        finally:
            browser.close()


def test_plain_clients_still_see_ollama_at_root(live):
    r = httpx.get(live.url + "/")
    assert r.text == "Ollama is running"
    html = httpx.get(live.url + "/", headers={"Accept": "text/html"})
    assert html.headers["content-type"].startswith("text/html") and "<script>" in html.text
    assert "default-src 'none'" in html.headers["content-security-policy"]
    assert "http" not in html.text.split("<script>")[0].replace("http-equiv", "")   # nothing from a CDN


def test_markdown_is_rendered_and_escaped(page):
    html = page.evaluate("markdown('Say **hi** and `x<y`\\n\\n```py\\nif a < b:\\n    pass\\n```\\n\\n- one\\n- two')")
    assert "<strong>hi</strong>" in html and "<code>x&lt;y</code>" in html
    assert '<pre><code class="lang-py">if a &lt; b:\n    pass</code></pre>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    hostile = page.evaluate("markdown('<img src=x onerror=alert(1)>')")
    assert "<img" not in hostile and "&lt;img" in hostile


def _enter_key(page) -> None:
    """Give the page the server's API key (the chat needs it: without it requests are refused)."""
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.wait_for_selector("#model option", state="attached")


def test_key_then_chat_streams_a_reply(page, live):
    assert page.is_visible("#keyrow")
    _enter_key(page)
    assert page.input_value("#model") == "tiny-chat"
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=120_000)
    stats = page.inner_text(".msg.assistant .stats")
    assert "tokens/s" in stats and "first token" in stats
    assert page.inner_text(".msg.user .body") == "Hello there"
    assert not page.query_selector(".msg.assistant .error")


def test_stop_midway_aborts_on_the_server(page, live):
    _enter_key(page)                      # also when this test runs alone
    gate = live.gate()
    aborted = live.service.counters.get("requests_aborted", 0)
    try:
        for attempt in range(3):          # a reply may end (EOS) within its first few tokens
            page.click("#new")            # a fresh conversation: earlier replies would fill the context
            gate.allow(1)                 # the prefill (and its first token), then the model is held
            replies = page.locator(".msg.assistant").count()
            page.fill("#input", f"Tell me a long story, take {attempt}")
            page.press("#input", "Enter")
            live.wait_for("the reply to start", lambda: page.locator(".msg.assistant").count() > replies)
            last_done = "#log > div:last-child[data-done='1']"
            live.wait_for("the reply to be held or end",
                          lambda: gate.blocked.is_set() or page.query_selector(last_done) is not None)
            if gate.blocked.is_set():
                break
        assert gate.blocked.is_set(), "every reply ended by itself"
        assert page.is_enabled("#stop") and live.service.engine.stats()["kv_pages_used"] > 0
        page.click("#stop")
        page.wait_for_selector("#log > div:last-child[data-done='1']")
        assert page.inner_text("#log > div:last-child .stats") == "stopped"
        live.wait_for("the abort", lambda: live.service.counters.get("requests_aborted", 0) > aborted)
        assert live.service.engine.stats()["kv_pages_used"] == 0         # freed with the model still held
    finally:
        gate.open()
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
