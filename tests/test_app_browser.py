"""The web app in a real browser: headless Debian Chromium (Playwright) against the served page.

Starts ``scripts/gradio/app.py`` with the tiny 256 model on CPU, uploads an image, generates a
4-frame video in 2 steps and saves a screenshot to ``test-output/app.png``. Needs Debian's
``chromium`` package at /usr/bin/chromium (``apt-get install -y chromium``); Playwright never
downloads a browser here. Without it the test is skipped with that message, except under CI
(``CI=true``), where it fails.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect, sync_playwright

from .conftest import require_system_program

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "test-output"
CHROMIUM = Path("/usr/bin/chromium")
# --disable-background-networking & co. keep Chromium from calling home on a closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STARTUP_TIMEOUT_S = 120
GENERATE_TIMEOUT_MS = 60_000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll ``url`` until it answers; fail with the server's log if it exits or takes too long."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the app exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with direct.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer on {url} within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server") / "app.log"


@pytest.fixture(scope="module")
def app_url(server_log) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    command = [sys.executable, "scripts/gradio/app.py", "--res", "256",
               "--checkpoint", "tests/data/tiny256.ckpt", "--config", "tests/data/tiny256.yaml",
               "--device", "cpu", "--port", str(port)]
    with server_log.open("w") as sink:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, server, server_log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium: without it this test is skipped with a message, except under CI where it fails."""
    return require_system_program(CHROMIUM, "chromium")


def set_slider(page, label: str, value: int) -> None:
    """Type a value into the number box of the slider with this label."""
    box = page.get_by_label(f"number input for {label}")
    box.fill(str(value))
    box.press("Enter")
    expect(box).to_have_value(str(value))


def test_generate_in_browser(chromium, app_url, server_log, gradient_png):
    OUTPUT.mkdir(exist_ok=True)
    outside: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: outside.append(request.url)
                    if urlsplit(request.url).hostname not in (None, "127.0.0.1") else None)
            page.goto(app_url, wait_until="networkidle")
            toasts = page.locator("[data-testid=toast-body]")

            page.locator("#generate").click()  # no image yet: a one-sentence message, no traceback
            expect(toasts).to_have_count(1)
            expect(toasts).to_contain_text("Please upload the input image.")
            page.locator("[data-testid=toast-close]").click()
            expect(toasts).to_have_count(0)

            page.locator("#image input[type=file]").set_input_files(str(gradient_png))
            expect(page.locator("#image img")).to_be_visible()
            page.locator("#prompt textarea").fill("a tiny robot dancing in the rain")
            set_slider(page, "Sampling steps", 2)
            set_slider(page, "Number of frames", 4)
            page.locator("#generate").click()

            video = page.locator("#video video")
            try:
                expect(video).to_have_attribute("src", re.compile(r"\.mp4$"), timeout=GENERATE_TIMEOUT_MS)
            except AssertionError:
                pytest.fail(f"no video appeared; messages: {toasts.all_inner_texts()}\n"
                            f"server log:\n{server_log.read_text()[-3000:]}")
            timing = page.locator("#timing textarea")
            expect(timing).to_have_value(re.compile(r"^Generated 4 frames in [0-9.]+ s$"))
            page.wait_for_function("v => v.readyState >= 2", arg=video.element_handle(), timeout=10_000)
            page.screenshot(path=str(OUTPUT / "app.png"), full_page=True)

            assert toasts.count() == 0, toasts.all_inner_texts()
            assert page.get_by_text("Error", exact=True).count() == 0
            assert page.evaluate("v => v.error", video.element_handle()) is None
            assert page.locator("#seed-used input").input_value() == "123"
        finally:
            browser.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"
