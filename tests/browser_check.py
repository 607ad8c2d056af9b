"""Open an HTML report in headless Chromium (Debian's ``chromium`` package) and check it.

:func:`ensure_chromium` finds ``chromium``, or installs it with ``apt-get`` when it is
missing (CI runs as root on Debian machines); it skips the test, saying why, only when
apt-get is unavailable. :func:`check_in_chromium` renders a copy of the page with a small
probe script injected first in ``<head>``: the probe records console errors, uncaught
exceptions and failed resource loads, and after ``load`` whether every ``<img>`` decoded
(``complete`` and ``naturalWidth > 0``); Chromium's ``--dump-dom`` returns the page with
the probe's JSON in it. It then screenshots the unmodified page into the artefact
directory (``MEDISYN_TEST_ARTIFACTS``, default ``test-artifacts/`` in the repository).
"""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """<script>
(function () {
  var errors = [];
  var oldError = console.error;
  console.error = function () {
    errors.push("console.error: " + Array.prototype.map.call(arguments, String).join(" "));
    return oldError.apply(console, arguments);
  };
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) {
      errors.push("failed to load " + (t.tagName || "") + " " + String(t.src || t.href).slice(-80));
    } else {
      errors.push("uncaught: " + (e.message || String(e)));
    }
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("unhandled rejection: " + e.reason); });
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                     .map(function (i) { return i.alt || String(i.src).slice(0, 60); });
    var pre = document.createElement("pre");
    pre.id = "medisyn-probe";
    pre.textContent = JSON.stringify({
      images: imgs.length, broken: broken, errors: errors, title: document.title,
      height: document.body ? document.body.scrollHeight : 0
    });
    document.body.appendChild(pre);
  });
})();
</script>"""


def artifacts_dir() -> Path:
    d = Path(os.environ.get("MEDISYN_TEST_ARTIFACTS", REPO / "test-artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def ensure_chromium() -> str:
    """The path of ``chromium``; installed with apt-get (as root) when missing."""
    from system_tools import ensure_tool

    return ensure_tool("chromium", "chromium")


def _run(chromium: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-extensions", "--disable-background-networking", "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=timeout)


def check_in_chromium(chromium: str, page: Path, *, artifact: str,
                      window: tuple[int, int] = (1280, 2400)) -> dict:
    """Render ``page``; return the probe's findings plus the DOM Chromium built and the
    screenshot's path. Raises AssertionError when Chromium fails."""
    page = Path(page).resolve()
    text = page.read_text(encoding="utf-8")
    probed = re.sub(r"(<head[^>]*>)", lambda m: m.group(1) + PROBE, text, count=1, flags=re.IGNORECASE)
    if probed == text:
        probed = PROBE + text
    probe_page = page.with_name(f".{page.stem}.probe.html")
    probe_page.write_text(probed, encoding="utf-8")
    try:
        res = _run(chromium, ["--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()])
    finally:
        probe_page.unlink(missing_ok=True)
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r'<pre id="medisyn-probe">(.*?)</pre>', res.stdout, re.DOTALL)
    assert m, "the probe did not run (page did not finish loading?):\n" + res.stdout[-2000:]
    found = json.loads(html_lib.unescape(m.group(1)))
    found["dom"] = res.stdout
    shot = artifacts_dir() / f"{artifact}.png"
    shot.unlink(missing_ok=True)
    res = _run(chromium, [f"--screenshot={shot}", f"--window-size={window[0]},{window[1]}",
                          page.as_uri()])
    assert res.returncode == 0 and shot.is_file(), res.stderr[-3000:]
    found["screenshot"] = shot
    return found


def distinct_colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as im:
        return len(im.convert("RGB").getcolors(maxcolors=1 << 20) or [])
