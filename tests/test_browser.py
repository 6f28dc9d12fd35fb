"""The chat page in headless Chromium (Debian's chromium + chromedriver through Selenium; no browser download).

The server runs a scripted generation (a stand-in for the model) so the page's rendering is what is
checked: streamed markdown with a highlighted code block, the thinking collapsible, stop, an image.
"""

from __future__ import annotations

import shutil
import time

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


class FakeProcessor:
    """Enough of a processor for the worker: templates to a fixed prompt, accepts images."""

    def apply_chat_template(self, messages, **kwargs):
        self.last_messages = messages
        return "prompt"

    def encode(self, text):
        return [1, 2, 3]

    def __call__(self, messages, **kwargs):
        self.last_messages = messages
        return [1, 2, 3, 4]  # stands in for ModelInputs: the scripted generation only counts it


@pytest.fixture(scope="module")
def page_server():
    processor = FakeProcessor()
    worker = GenerationWorker(lambda: (None, processor), generate=scripted(REPLY, delay=0.01))
    running = RunningServer(worker, ServerSettings(model_id="scripted"))
    running.processor = processor
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
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 15.0):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, "timed out waiting for the page"
        time.sleep(0.05)
    return value


def test_chat_page_streams_stops_and_attaches(page_server, browser, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    browser.get(page_server.url)

    # Read through JavaScript: the page re-renders while streaming, which makes element handles stale.
    def find(css):
        return browser.execute_script(f"return document.querySelectorAll({css!r}).length")

    def text(css):
        return browser.execute_script(f"const e = document.querySelector({css!r}); return e ? e.textContent : ''")

    wait_for(lambda: browser.find_element(By.ID, "model-name").text == "scripted")

    # Send a message and watch the answer stream in, then stop it mid-way.
    browser.find_element(By.ID, "prompt").send_keys("Show me code")
    browser.find_element(By.ID, "send").click()
    wait_for(lambda: find(".message.assistant pre code.hljs"))
    assert text("details.thinking div") == "Weighing it up."
    assert text(".message.assistant strong") == "code"
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: "stopped" in text(".message.assistant .meta"))
    answer = text(".message.assistant .answer")
    assert answer.startswith("Here is code") and answer.count("More text.") < 150, "stop did not stop the stream"
    wait_for(lambda: not page_server.worker.busy, timeout=3)

    # Attach an image through the file input: a thumbnail, then an image part sent to the processor.
    image = tmp_path / "blue.png"
    Image.new("RGB", (40, 30), "blue").save(image)
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait_for(lambda: find("#attachments img"))
    browser.find_element(By.ID, "prompt").send_keys("What is this?")
    browser.find_element(By.ID, "send").click()
    wait_for(lambda: find(".message.user img") == 1)
    wait_for(lambda: "tok/s" in text("#stats"), timeout=30)
    user_turn = page_server.processor.last_messages[-1]
    assert user_turn["content"][0]["type"] == "image" and user_turn["content"][0]["image"].size == (40, 30)

    # The conversation survives a reload (localStorage).
    browser.refresh()
    wait_for(lambda: find(".message.user") == 2)

    shot = tmp_path / "chat-page.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
