"""Headless Chromium driven over the DevTools protocol on a pipe, to check and photograph the live page.

`chromium --dump-dom` / `--screenshot` act right after the page's load event, before the event stream
has delivered anything, and `--virtual-time-budget` waits for ever on a stream that stays open. So
this opens the page, waits until a JavaScript condition holds, then reads the DOM or takes a
screenshot. `--remote-debugging-pipe` speaks JSON messages separated by NUL bytes: commands on the
browser's fd 3, replies and events on its fd 4; no WebSocket library is needed.
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--no-first-run", "--hide-scrollbars",
                  "--remote-debugging-pipe")


class HeadlessChromium:
    """One headless browser with one page; use as a context manager."""

    def __init__(self, executable: str | None = None, *, window: tuple[int, int] = (1400, 1000),
                 timeout_s: float = 30.0):
        executable = executable or shutil.which("chromium")
        if executable is None:
            raise FileNotFoundError("HeadlessChromium: no 'chromium' on PATH (Debian: apt-get install chromium)")
        self.timeout_s = timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="viewer-chromium-")
        self._stderr = open(Path(self._profile.name) / "stderr.log", "w+b")  # read back when it fails
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [*CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}/profile",
                f"--window-size={window[0]},{window[1]}", "about:blank"]
        # bash moves our pipe ends onto the fds 3 and 4 Chromium expects (dash takes only 1-digit fds).
        self._process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}', executable, *args],
            pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self._stderr)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None
        try:
            page = next(t for t in self._call("Target.getTargets")["targetInfos"] if t["type"] == "page")
            self._session = self._call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True},
                                       session=False)["sessionId"]
            self._call("Emulation.setDeviceMetricsOverride", {"width": window[0], "height": window[1],
                                                              "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def open(self, url: str) -> None:
        self._call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        reply = self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in reply:
            raise RuntimeError(f"HeadlessChromium: {expression!r:.80} threw: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 10.0) -> Any:
        """Poll `expression` until it is truthy; its value. TimeoutError names the expression."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"HeadlessChromium: {expression!r} still {value!r} after {timeout_s} s")
            time.sleep(0.05)

    def dom(self) -> str:
        """The page's current DOM as HTML."""
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, path: str | Path) -> None:
        """Save the viewport as PNG."""
        png = base64.b64decode(self._call("Page.captureScreenshot", {"format": "png"})["data"])
        Path(path).write_bytes(png)

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._call("Browser.close", session=False)
            except (OSError, RuntimeError, TimeoutError):
                pass
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass  # closed before
        self._stderr.close()
        self._profile.cleanup()

    def _call(self, method: str, params: dict | None = None, *, session: bool = True) -> dict:
        """Send one command (to the page's session unless `session` is False) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self._session is not None:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = json.loads(self._read_message(deadline))
            if reply.get("id") == self._next_id:  # anything else is an event we did not ask for
                if "error" in reply:
                    raise RuntimeError(f"HeadlessChromium: {method} failed: {reply['error']}")
                return reply["result"]

    def _read_message(self, deadline: float) -> bytes:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"HeadlessChromium: no reply within {self.timeout_s} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                self._stderr.seek(0)
                tail = self._stderr.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"HeadlessChromium: chromium exited (code {self._process.poll()}); stderr:\n{tail}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return message


def main(argv: list[str] | None = None) -> int:
    """python -m realtime.viewer.headless URL OUT.png: photograph a live viewer once it shows N trials."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m realtime.viewer.headless",
        description="Photograph a live viewer page (mindeye-realtime / mindeye-viewer / mindeye-demo) in headless "
                    "Chromium, once it shows at least --cards decoded trials and every image in view has loaded.",
        epilog="Example: python -m realtime.viewer.headless http://127.0.0.1:8080/ docs/images/viewer.png --cards 36")
    parser.add_argument("url")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--cards", type=int, default=1, help="decoded trials to wait for (default 1)")
    parser.add_argument("--size", default="1400x1000", help="viewport WIDTHxHEIGHT in px (default 1400x1000)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the trials (default 60)")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size {args.size!r}: give WIDTHxHEIGHT, e.g. 1400x1000")
    try:
        with HeadlessChromium(window=(width, height)) as browser:
            browser.open(args.url)
            browser.wait_for(f"document.querySelectorAll('article.card').length >= {args.cards}", args.timeout)
            # lazy images below the fold never load without a scroll: wait for those in view
            browser.wait_for("[...document.images].filter(i => i.getBoundingClientRect().top < innerHeight)"
                             ".every(i => i.complete)", args.timeout)
            browser.screenshot(args.out)
    except (FileNotFoundError, RuntimeError, TimeoutError, OSError) as error:
        print(f"screenshot of {args.url} failed: {error}")
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
