"""End to end: the real server on loopback, driven in Debian's headless Chromium by Playwright."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
sync_api = pytest.importorskip("playwright.sync_api")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unfog", "serve", "--model", str(tiny_model_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/v1/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@contextlib.contextmanager
def open_page(server):
    """The web page in headless Chromium, loaded and with its sampler list filled."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.wait_for_function("document.querySelector('#sampler').options.length > 0")
            yield page
        finally:
            browser.close()


def test_generate_from_the_page(server, tmp_path):
    with open_page(server) as page:
        page.fill("#prompt", "a yellow circle in the center")
        page.fill("#steps", "6")
        page.fill("#seed", "3")
        page.click("#generate")
        img = page.wait_for_selector("#gallery figure img", timeout=60_000)
        page.wait_for_function("document.querySelector('#gallery figure img').naturalWidth > 0")
        assert img.evaluate("el => el.naturalWidth") == 32
        assert "seed 3" in page.inner_text("#gallery figcaption")
        assert page.eval_on_selector("#progress", "el => el.value") == 6
        assert page.eval_on_selector("#preview", "el => el.src.startsWith('data:image/png')")
        page.screenshot(path=str(tmp_path / "page.png"))
        os.environ.get("UNFOG_SCREENSHOT") and shutil.copy(tmp_path / "page.png", os.environ["UNFOG_SCREENSHOT"])


def test_a_dropped_png_refills_the_form(server, tiny_model_dir, tmp_path):
    from unfog.cli import main

    png = tmp_path / "made.png"
    assert main(["generate", "a green triangle at the top", "-o", str(png), "--model", str(tiny_model_dir), "--steps", "5",
                 "--seed", "77", "--negative", "red", "--guidance", "2.5", "--sampler", "euler", "-q"]) == 0
    with open_page(server) as page:
        page.set_input_files("#png", str(png))
        page.wait_for_function("document.querySelector('#status').textContent.includes('settings loaded')")
        values = {k: page.input_value(f"#{k}") for k in ("prompt", "negative", "steps", "guidance", "seed", "sampler", "width")}
        assert values == {"prompt": "a green triangle at the top", "negative": "red", "steps": "5", "guidance": "2.5", "seed": "77",
                          "sampler": "euler", "width": "32"}
