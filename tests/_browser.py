"""Headless Chromium driven over the DevTools protocol (a pipe: no port, no websocket library).

The tests use it to open one page and ask three things of it: which requests did
THIS page make (``Network.requestWillBeSent`` of the page's own session and of the
workers and frames it starts; the browser's own background traffic belongs to no
page and is never seen here), which Content-Security-Policy violations did it report,
and what did it draw (its DOM, screenshots). A test can therefore fail only when the
page asks for something, not when the browser phones home during a slow load.

>>> Chromium.find() is None or isinstance(Chromium.find(), str)
True
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Runs in the page before any of its own scripts: every CSP violation is kept.
_WATCH_CSP = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation',
  e => window.__cspViolations.push(e.blockedURI + ' (' + e.violatedDirective + ')'));
"""

# Schemes that never reach a network: inline data, blobs the page made itself.
LOCAL_SCHEMES = ("data:", "blob:", "about:")


@dataclass
class PageVisit:
    """What one page did: its requests (URLs, in order), CSP violations, DOM, screenshots."""

    url: str
    requests: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    dom: str = ""
    height: int = 0

    def network_requests(self) -> list[str]:
        """The page's requests except its own document and local schemes (data:, blob:)."""
        return [u for u in self.requests if u != self.url and not u.startswith(LOCAL_SCHEMES)]


class Chromium:
    """One headless Chromium; ``visit(url)`` opens a fresh page and reports what it did.

    Its own background traffic is sent to a closed local port (``--proxy-server``) so
    nothing leaves the machine; the page's requests are read from the protocol, not
    from that proxy.
    """

    def __init__(self, executable: str | None = None, *, width: int = 1200, height: int = 900) -> None:
        executable = executable or self.find()
        if executable is None:
            raise FileNotFoundError("Chromium is not installed (apt-get install chromium).")
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="massact-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_pipes() -> None:  # the protocol's pipe: the browser reads fd 3, writes fd 4
            import fcntl

            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]
            for fd, wanted in zip(high, (3, 4), strict=True):
                os.dup2(fd, wanted, inheritable=True)

        self.process = subprocess.Popen(
            [
                executable, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
                "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "--remote-debugging-pipe", "about:blank",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire_pipes, close_fds=False,  # noqa: PLW1509
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self._targets: list[str] = []

    @staticmethod
    def find() -> str | None:
        return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

    # ------------------------------------------------------------------ protocol

    def _read_message(self, timeout: float) -> dict[str, Any] | None:
        import select

        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (it exited).")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        """Call one protocol method and wait for its answer (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(max(0.0, deadline - time.monotonic()))
            if reply is None:
                raise TimeoutError(f"{method}: no answer in {timeout:.0f} s")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def _drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            event = self._read_message(left)
            if event is not None:
                self._events.append(event)

    # ------------------------------------------------------------------ pages

    def visit(self, url: str, *, wait_for: str = "true", timeout: float = 90.0, quiet: float = 1.0,
              width: int | None = None, scripts: bool = True) -> tuple[PageVisit, str]:
        """Open ``url`` in a new page; wait until it loaded, ``wait_for`` (JS) is true and ``quiet`` s pass.

        ``scripts=False`` opens it with the page's JavaScript off (what a viewer that
        runs none shows). Returns the visit and the page's session id (for
        :meth:`screenshot` / :meth:`evaluate`).
        """
        for old in self._targets:  # one page open at a time: the previous visit's page closes now
            with contextlib.suppress(RuntimeError, TimeoutError):
                self.send("Target.closeTarget", {"targetId": old}, timeout=10)
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._targets = [target]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._events.clear()
        for method, params in (
            ("Network.enable", {}), ("Page.enable", {}), ("Runtime.enable", {}),
            ("Page.addScriptToEvaluateOnNewDocument", {"source": _WATCH_CSP}),
            ("Emulation.setDeviceMetricsOverride",
             {"width": width or self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False}),
            # workers and out-of-process frames the page starts: their requests are the page's too
            ("Target.setAutoAttach", {"autoAttach": True, "waitForDebuggerOnStart": False, "flatten": True}),
            ("Emulation.setScriptExecutionDisabled", {"value": not scripts}),
        ):
            self.send(method, params, session)
        self.send("Page.navigate", {"url": url}, session)
        visit = PageVisit(url)
        sessions = {session}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._drain(0.25)
            self._collect(visit, sessions)
            try:
                done = self.evaluate(session, f"location.href === {json.dumps(url)} && "
                                              f"document.readyState === 'complete' && Boolean({wait_for})")
            except RuntimeError:  # the page is between documents
                done = False
            if done:
                break
        else:
            raise TimeoutError(f"{url}: not ready after {timeout:.0f} s ({wait_for})")
        self._drain(quiet)
        self._collect(visit, sessions)
        visit.csp_violations = list(self.evaluate(session, "window.__cspViolations || []"))
        visit.dom = str(self.evaluate(session, "document.documentElement.outerHTML"))
        visit.height = int(self.evaluate(session, "document.documentElement.scrollHeight"))
        return visit, session

    def _collect(self, visit: PageVisit, sessions: set[str]) -> None:
        for event in self._events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Target.attachedToTarget" and event.get("sessionId") in sessions:
                child = params["sessionId"]
                sessions.add(child)
                for enable in ("Network.enable", "Runtime.runIfWaitingForDebugger"):
                    with contextlib.suppress(RuntimeError, TimeoutError):
                        self.send(enable, {}, child, timeout=10)
            elif event.get("sessionId") not in sessions:
                continue
            elif method == "Network.requestWillBeSent":
                visit.requests.append(params["request"]["url"])
            elif method == "Runtime.exceptionThrown":
                visit.console_errors.append(str(params["exceptionDetails"].get("text")))
        self._events.clear()

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def screenshot(self, session: str, path: str | os.PathLike[str], *, top: int = 0, height: int = 2000,
                   width: int | None = None) -> Path:
        """A PNG of the page from ``top`` down ``height`` px (beyond the viewport too)."""
        clip = {"x": 0, "y": top, "width": width or self.width, "height": height, "scale": 1}
        data = self.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                         session)["data"]
        out = Path(path)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
