"""Headless Chromium over the Chrome DevTools Protocol, through a pipe: render a page, check it, screenshot it.

Chromium is started with `--remote-debugging-pipe` (through a two-line Python trampoline that puts the pipe
ends on descriptors 3 and 4): it reads protocol messages (JSON, each ended by a NUL
byte) on its file descriptor 3 and writes replies and events on 4, so no port is opened and no
WebSocket library is needed. The flags keep it off the network (no background networking, component
updates, sync or QUIC) and it runs in a fresh profile directory, removed at close.

Used by the HTML report's tests and benchmark; `check_page` is the whole check: the page's charts all
drew (canvas pixels painted, more than one colour), no console error or uncaught exception, no
network request other than the page itself, and the time from navigation to the last chart drawn.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio")


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """A Chromium executable: $GPULEDGER_CHROMIUM, else chromium (Debian) or Chrome on the PATH."""
    env = os.environ.get("GPULEDGER_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


_TRAMPOLINE = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
               "os.execv(sys.argv[3], sys.argv[3:])")


def _high_fd(fd: int) -> int:
    import fcntl

    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium; `with Browser() as b: page = b.new_page(); page.goto(url)`."""

    def __init__(self, executable: str | None = None, timeout_s: float = 60.0) -> None:
        exe = executable or find_chromium()
        if not exe:
            raise BrowserError("no Chromium found: install Debian's chromium package, or set GPULEDGER_CHROMIUM")
        self.timeout_s = timeout_s
        self.profile = tempfile.mkdtemp(prefix="gpuledger-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child's ends move above 9 first, so putting them on 3 and 4 cannot overwrite one with the other; a
        # small Python trampoline does that and execs Chromium (no preexec_fn in a threaded process)
        to_child_r, from_child_w = (_high_fd(fd) for fd in (to_child_r, from_child_w))
        cmd = [sys.executable, "-c", _TRAMPOLINE, str(to_child_r), str(from_child_w), exe, *FLAGS,
               f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(cmd, pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._lock = threading.Lock()
        self._waiting: dict[int, queue.Queue] = {}
        self._listeners: dict[str, list] = {}  # session id -> [callback(method, params)]
        self._stderr: list[bytes] = []
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()
        threading.Thread(target=self._drain_stderr, name="cdp-stderr", daemon=True).start()
        self.version = self.call("Browser.getVersion")

    # ------------------------------------------------------------------ protocol
    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            if len(self._stderr) < 200:
                self._stderr.append(line)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    q = self._waiting.pop(msg["id"], None)
                    if q is not None:
                        q.put(msg)
                else:
                    for cb in list(self._listeners.get(msg.get("sessionId", ""), ())):
                        cb(msg["method"], msg.get("params", {}))
        for q in list(self._waiting.values()):
            q.put({"error": {"message": "Chromium closed the pipe"}})

    def call(self, method: str, params: dict | None = None, session: str = "", timeout_s: float | None = None) -> dict:
        with self._lock:
            self._next_id += 1
            mid = self._next_id
            q: queue.Queue = queue.Queue(1)
            self._waiting[mid] = q
            msg = {"id": mid, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        try:
            reply = q.get(timeout=timeout_s or self.timeout_s)
        except queue.Empty:
            self._waiting.pop(mid, None)
            raise BrowserError(f"{method}: no reply from Chromium in {timeout_s or self.timeout_s:g} s") from None
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')} {reply['error'].get('data', '')}".strip())
        return reply.get("result", {})

    def listen(self, session: str, callback) -> None:
        self._listeners.setdefault(session, []).append(callback)

    # ------------------------------------------------------------------ pages
    def new_page(self, width: int = 1280, height: int = 900) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session, target)
        self.listen(session, page._event)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        page.resize(width, height)
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout_s=5)
            except BrowserError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Page:
    browser: Browser
    session: str
    target: str
    console: list[tuple[str, str]] = field(default_factory=list)  # (level, text)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    _loaded: threading.Event = field(default_factory=threading.Event)

    def _event(self, method: str, p: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            self.console.append((p.get("type", ""), text))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            self.console.append((e.get("level", ""), e.get("text", "")))
        elif method == "Network.requestWillBeSent":
            self.requests.append(p.get("request", {}).get("url", ""))
        elif method == "Network.loadingFailed":
            self.failed_requests.append(p.get("errorText", ""))
        elif method == "Page.loadEventFired":
            self._loaded.set()

    def call(self, method: str, params: dict | None = None, timeout_s: float | None = None) -> dict:
        return self.browser.call(method, params, self.session, timeout_s)

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def goto(self, url: str, timeout_s: float = 60.0) -> None:
        self._loaded.clear()
        nav = self.call("Page.navigate", {"url": url})
        if nav.get("errorText"):
            raise BrowserError(f"navigating to {url}: {nav['errorText']}")
        if not self._loaded.wait(timeout_s):
            raise BrowserError(f"{url}: no load event in {timeout_s:g} s")

    def evaluate(self, expression: str, await_promise: bool = False, timeout_s: float | None = None):
        r = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": await_promise,
                                           "returnByValue": True}, timeout_s)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise BrowserError(f"evaluating {expression[:60]!r}: "
                               f"{d.get('exception', {}).get('description') or d.get('text')}")
        return r.get("result", {}).get("value")

    def screenshot(self, path, full_page: bool = True, max_height: int = 16000) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            m = self.call("Page.getLayoutMetrics")
            size = m.get("cssContentSize") or m["contentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], max_height),
                              "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", params)["data"]
        out = Path(path)
        out.write_bytes(base64.b64decode(data))
        return out


CHART_PIXELS_JS = """
(() => [...document.querySelectorAll('[data-chart]')].map((el) => {
  const c = el.querySelector('canvas');
  const out = {name: el.dataset.chart, state: el.dataset.state || '', width: 0, height: 0, painted: 0, colors: 0};
  if (!c) return out;
  out.width = c.width; out.height = c.height;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const colors = new Set();
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0 && !(d[i] > 245 && d[i + 1] > 245 && d[i + 2] > 245)) {
      out.painted++;
      if (colors.size < 256) colors.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    }
  }
  out.colors = colors.size;
  return out;
}))()
"""


@dataclass
class PageCheck:
    url: str
    charts: list[dict]  # name, state, width, height, painted (pixels), colors
    drawn_ms: float  # navigation start to every chart drawn, as the page measured it
    errors: list[str]  # console errors and warnings, uncaught exceptions
    foreign_requests: list[str]  # requests for anything but the page itself
    screenshot: Path | None = None

    @property
    def blank_charts(self) -> list[str]:
        return [c["name"] for c in self.charts
                if c["state"] != "drawn" or c["painted"] < 0.01 * max(1, c["width"] * c["height"]) or c["colors"] < 3]


def check_page(browser: Browser, path, screenshot: str | Path | None = None, width: int = 1280,
               timeout_s: float = 60.0) -> PageCheck:
    """Open a local HTML file, wait for its charts (window.glChartsDone), and report what drew."""
    page = browser.new_page(width, 900)
    url = Path(path).resolve().as_uri()
    try:
        page.goto(url, timeout_s)
        page.evaluate("window.glChartsDone", await_promise=True, timeout_s=timeout_s)
        drawn_ms = page.evaluate("window.glDrawnMs")
        charts = page.evaluate(CHART_PIXELS_JS, timeout_s=timeout_s)
        shot = page.screenshot(screenshot) if screenshot else None
        time.sleep(0.05)  # late console messages
        errors = [f"{lvl}: {text}" for lvl, text in page.console if lvl in ("error", "warning", "assert")]
        errors += [f"exception: {e}" for e in page.exceptions]
        foreign = [u for u in page.requests if u != url and not u.startswith(("data:", "blob:", "about:"))]
        return PageCheck(url, charts, float(drawn_ms or 0.0), errors, foreign, shot)
    finally:
        try:
            browser.call("Target.closeTarget", {"targetId": page.target}, timeout_s=10)
        except BrowserError:
            pass
