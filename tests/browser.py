"""Open a generated page in a real headless Chromium: screenshot, console, images, fetches."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from PIL import Image

NO_CHROMIUM = "chromium not installed (`apt-get install -y chromium`; .ci/run does it)"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


_CHECK = """<script>
window.__errors = [];
const _error = console.error;
console.error = (...args) => { window.__errors.push(args.join(' ')); _error.apply(console, args); };
window.addEventListener('error', e => window.__errors.push('error: ' + (e.message || (e.target && (e.target.src || '').slice(0, 40)))), true);
document.addEventListener('securitypolicyviolation', e => window.__errors.push('csp: ' + e.blockedURI));
window.addEventListener('load', () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  const fetched = performance.getEntriesByType('resource').map(r => r.name);
  const out = document.createElement('pre');
  out.id = 'page-check';
  out.textContent = JSON.stringify({images: document.images.length, broken, fetched, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def _browser(*args: str, user_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={user_dir}", "--enable-logging=stderr", "--v=0", *args],
        capture_output=True, text=True, timeout=120,
    )


def check_in_browser(page: Path, tmp_path: Path) -> dict:
    """Screenshot `page` (not blank, no console line), then load it with a probe script.

    Asserts that no image is broken, nothing is fetched and no error is raised; returns
    the probe's findings ({images, broken, fetched, errors}) for page-specific checks.
    """
    shot = page.with_suffix(".png")
    result = _browser(f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri(), user_dir=tmp_path / "a")
    assert shot.is_file(), result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # the page has no script: any console line is an error (CSP, load)
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 3000)
    low, high = image.getextrema()
    assert high - low > 100  # not a blank page

    # the same page plus a probe script (CSP widened for it only): images decoded, no errors
    source = page.read_text().replace("style-src 'unsafe-inline'", "style-src 'unsafe-inline'; script-src 'unsafe-inline'")
    assert "script-src" in source, "the page must carry a Content-Security-Policy"
    checked = tmp_path / "checked.html"
    checked.write_text(source.replace("<head>", "<head>" + _CHECK, 1))
    dom = _browser("--virtual-time-budget=10000", "--dump-dom", checked.as_uri(), user_dir=tmp_path / "b")
    found = re.search(r'<pre id="page-check">(.*?)</pre>', dom.stdout)
    assert found, dom.stdout[-1000:] + dom.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check == {**check, "broken": 0, "fetched": [], "errors": []}
    return check
