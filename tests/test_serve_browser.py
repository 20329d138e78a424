"""The chat page at / in a real headless Chromium (Debian's, driven by Playwright):
type a message, watch the reply stream in, send a second one, check both turns were sent.

Skipped when Playwright or /usr/bin/chromium is missing, unless NANOSEEK_REQUIRE_BROWSER=1
(set it in CI so that a missing browser fails instead of silently skipping).
"""

import json
import os
import shutil

import pytest

from nanoseek.engine import Engine
from nanoseek.serve import create_app
from tests.test_serve_helpers import CharTokenizer, GatedModel, LiveServer, tiny_model

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _sync_playwright():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install playwright==1.65.2)"
    if missing is None and not shutil.which(CHROMIUM):
        missing = f"{CHROMIUM} not found (apt-get install chromium)"
    if missing:
        if os.environ.get("NANOSEEK_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture(scope="module")
def server():
    # 30 ms a step: the reply takes about a second, so streaming is visible as many updates
    engine = Engine(GatedModel(tiny_model(seed=0, max_seq_len=512), delay=0.03), CharTokenizer(), num_blocks=64)
    with LiveServer(create_app(engine, "tiny-chat")) as url:
        yield url


# counts how often the newest reply's text changes, to tell a stream from one late update
COUNT_UPDATES = """
window.__updates = 0;
new MutationObserver(() => { window.__updates += 1; })
  .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def test_chat_page_streams_and_keeps_the_conversation(server):
    sync_playwright = _sync_playwright()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            sent = []
            page.on("request", lambda req: sent.append(json.loads(req.post_data))
                    if req.url.endswith("/v1/chat/completions") else None)
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny-chat'", timeout=10_000)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "24")
            page.evaluate(COUNT_UPDATES)

            page.fill("#input", "Hello there")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=30_000)
            first_reply = page.text_content(".msg.assistant .content >> nth=0")
            updates = page.evaluate("window.__updates")
            assert first_reply.strip(), "no reply text appeared"
            assert updates >= 5, f"the reply arrived in {updates} DOM updates: not streamed"
            assert page.inner_text("#status") == "ready"

            page.fill("#input", "And again")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='true'] >> nth=1", timeout=30_000)
            assert page.locator(".msg.user").all_inner_texts() == ["Hello there", "And again"]
            assert page.locator(".msg.error").count() == 0
            if os.environ.get("NANOSEEK_SCREENSHOT"):
                page.screenshot(path=os.environ["NANOSEEK_SCREENSHOT"])

            assert len(sent) == 2 and all(b["stream"] is True and b["model"] == "tiny-chat" for b in sent)
            assert sent[0]["messages"] == [{"role": "user", "content": "Hello there"}]
            assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
            assert sent[1]["messages"][1]["content"] == first_reply
            assert sent[1]["messages"][2]["content"] == "And again"
        finally:
            browser.close()
