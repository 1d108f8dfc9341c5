"""The HTML report of the real model, opened in headless Chromium: no console errors, every site listed and drawn,
screenshots taken; and the report is written in under 10 s.

Chromium is driven over the DevTools protocol through `--remote-debugging-pipe` (JSON messages on fds 3/4), so
nothing beyond the standard library is needed to read console messages and exceptions. Without a `chromium`
binary these tests skip and say so (`.ci/run` installs it). Screenshots go to the test's tmp dir, or to
$LINEARIZE_SCREENSHOT_DIR when set.
"""
from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import linearize
from linearize.report.draw import dot_available

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium; "
                                                             ".ci/run installs it)")
needs_dot = pytest.mark.skipif(dot_available() is None, reason="Graphviz `dot` not installed (apt-get install "
                                                               "graphviz; .ci/run installs it)")


class Browser:
    """A headless Chromium page over the DevTools protocol on a pipe; collects console errors and exceptions."""

    def __init__(self, width=1400, height=1800):
        self.profile = tempfile.mkdtemp(prefix="linearize-chromium-")
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()

        def child_fds():
            os.dup2(cmd_r, 3)
            os.dup2(resp_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={self.profile}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, close_fds=False)
        os.close(cmd_r)
        os.close(resp_w)
        self._next_id = 0
        self._replies: dict = {}
        self._events: "queue.Queue" = queue.Queue()
        self._cond = threading.Condition()
        self.console_errors: list = []
        self.events_seen: list = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _read(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._resp_r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    self._on_event(msg)

    def _on_event(self, msg):
        method, params = msg.get("method"), msg.get("params", {})
        self.events_seen.append(method)
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console_errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.console_errors.append(f"exception: {d.get('text')} {d.get('exception', {}).get('description', '')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            e = params["entry"]
            self.console_errors.append(f"log.{e.get('source')}: {e.get('text')} {e.get('url', '')}")
        self._events.put(msg)

    def call(self, method, session=False, timeout=60, **params):
        self._next_id += 1
        mid = self._next_id
        msg = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(f"no reply to {method} (chromium exit code {self.proc.poll()})")
                self._cond.wait(min(left, 0.5))
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {method} event")
            try:
                msg = self._events.get(timeout=left)
            except queue.Empty:
                continue
            if msg.get("method") == method:
                return msg.get("params", {})

    def open(self, path, timeout=60):
        self.call("Page.navigate", session=True, url=Path(path).resolve().as_uri())
        self.wait_event("Page.loadEventFired", timeout=timeout)

    def js(self, expression, timeout=60):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", session=True, format="png")["data"])
        Path(path).write_bytes(data)
        return data

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        shutil.rmtree(self.profile, ignore_errors=True)


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _shot_dir(tmp_path) -> Path:
    d = os.environ.get("LINEARIZE_SCREENSHOT_DIR")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        return Path(d)
    return tmp_path


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


@needs_chromium
def test_browser_harness_sees_console_errors_and_exceptions(tmp_path, browser):
    """The harness itself: a page that logs an error and throws must be caught, a clean page must not."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head><link rel='icon' href='data:,'></head><body><p>x</p><script>"
                   "console.error('boom from page'); throw new Error('thrown on purpose');</script></body></html>")
    browser.open(bad)
    time.sleep(0.3)
    joined = "\n".join(browser.console_errors)
    assert "boom from page" in joined and "thrown on purpose" in joined
    browser.console_errors.clear()
    good = tmp_path / "good.html"
    good.write_text("<!DOCTYPE html><html><head><link rel='icon' href='data:,'></head><body><p id=ok>fine</p>"
                    "</body></html>")
    browser.open(good)
    assert browser.js("document.getElementById('ok').textContent") == "fine"
    assert browser.console_errors == []


def _rule_set() -> str:
    from linearize.rewrite import rules as R

    return "liger-hybrid" if "liger-hybrid" in R.available() else "liger"


@pytest.fixture(scope="module")
def smollm2_report(smollm2, tmp_path_factory):
    from linearize.data import english_token_ids

    model, tok = smollm2
    ids = english_token_ids(tok, 64)
    report = linearize.explain(model, ids, rules=_rule_set())
    path = tmp_path_factory.mktemp("report") / "smollm2.html"
    start = time.perf_counter()
    report.write_html(path)
    return report, path, time.perf_counter() - start


@pytest.mark.slow
@needs_dot
def test_smollm2_report_is_written_in_under_10_seconds(smollm2_report):
    report, path, seconds = smollm2_report
    assert len(report.sites) == 30
    assert seconds < 10.0, f"writing the SmolLM2 report took {seconds:.1f} s"
    text = path.read_text()
    assert text.count('<section class="site') == 30
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
        'xmlns:xlink="http://www.w3.org/1999/xlink"', ""), "the report must not reference the network"


@pytest.mark.slow
@needs_dot
@needs_chromium
def test_smollm2_report_opens_in_chromium_with_every_site_listed_and_drawn(smollm2_report, browser, tmp_path):
    report, path, _ = smollm2_report
    shots = _shot_dir(tmp_path)
    browser.open(path)
    top = browser.screenshot(shots / "smollm2_report_top.png")
    assert png_size(top) == (1400, 1800) and len(top) > 50_000, "the screenshot looks blank"

    n = len(report.sites)
    listed = browser.js("Array.from(document.querySelectorAll('#sites tbody tr')).map(r => r.dataset.site)")
    assert listed == [str(i) for i in range(n)]
    modules = browser.js("Array.from(document.querySelectorAll('#sites tbody tr td:nth-child(3)'))"
                         ".map(td => td.textContent)")
    assert modules == [s.module_path for s in report.sites]

    browser.js("document.getElementById('expand-all').click()")
    drawn = browser.js("""Array.from(document.querySelectorAll('section.site')).map(sec => {
        const svgs = Array.from(sec.querySelectorAll('figure svg'));
        return {site: sec.dataset.site, svgs: svgs.length,
                widths: svgs.map(s => Math.round(s.getBoundingClientRect().width)),
                nodes: svgs.map(s => s.querySelectorAll('g.node').length),
                matched: sec.querySelectorAll('figure svg g.node.matched').length,
                inserted: sec.querySelectorAll('figure svg g.node.new').length,
                edgeLabels: sec.querySelectorAll('figure svg g.edge text').length};
    })""")
    assert [d["site"] for d in drawn] == [str(i) for i in range(n)]
    for d, site in zip(drawn, report.sites):
        want = 1 if site.rewrite == "keep" else 2
        assert d["svgs"] == want, d
        assert all(w > 300 for w in d["widths"]), d  # laid out and visible once expanded
        assert all(k >= 10 for k in d["nodes"]), d
        assert d["matched"] >= 1, d
        assert d["edgeLabels"] > 10, d  # shapes and dtypes on the edges
        if site.rewrite != "keep":
            assert d["inserted"] >= 1, d

    # jump to the last site through the summary link, as a reader would, and photograph its drawing
    browser.js("document.getElementById('collapse-all').click(); "
               f"document.querySelector('#row-{n - 1} a').click()")
    time.sleep(0.3)
    assert browser.js(f"document.getElementById('site-{n - 1}').closest('details').open") is True
    site_shot = browser.screenshot(shots / "smollm2_report_last_site.png")
    assert len(site_shot) > 50_000
    assert browser.console_errors == [], browser.console_errors
