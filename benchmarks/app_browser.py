"""Drive `medlens app` in a real headless Chromium (Debian's /usr/bin/chromium through Playwright; Playwright never
downloads a browser here): start the server on a free localhost port, open the page, and the few page actions the
browser test, the screenshot script and the benchmark share.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

CHROMIUM = os.environ.get("MEDLENS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
# the pictures in the page: Streamlit images, and the interactive overlays (each a small page in an iframe)
OVERLAY = '[data-testid="stMain"] iframe[data-testid="stIFrame"]'
IMAGE = '[data-testid="stMain"] [data-testid="stImage"] img, ' + OVERLAY
# an <img>: its source; an overlay: what its canvas shows once drawn (its view and threshold; "loading" until then)
_SOURCES = """els => els.map(e => {
  if (e.tagName.toLowerCase() === 'img') return e.src;
  const doc = e.contentDocument, pic = doc && doc.getElementById('picture');
  if (!pic || !pic.dataset.drawn || doc.readyState !== 'complete') return 'loading';
  return 'overlay:' + pic.dataset.drawn;
})"""


def browser_missing() -> Optional[str]:
    """Why the browser tests cannot run here (None when they can)."""
    try:
        import playwright.sync_api  # noqa: F401  (only whether it is there)
    except ImportError:
        return "playwright is not installed (pip install 'medlens[test]')"
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served_app(*args: str, port: Optional[int] = None, log: Optional[Path] = None,
               env: Optional[dict[str, str]] = None) -> Iterator[str]:
    """`medlens app --port P ARGS` running until the block ends (with `env` added to its environment); yields its URL."""
    port = port or free_port()
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", **(env or {}))
    out = open(log, "wb") if log else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "-m", "medlens", "app", "--port", str(port), *args], env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"medlens app did not start (exit status {process.poll()})")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        if log:
            out.close()  # type: ignore[union-attr]


@contextlib.contextmanager
def browser(headless: bool = True) -> Iterator[Any]:
    """One headless Chromium (Debian's), closed when the block ends."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=headless)
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def browser_page(url: str, width: int = 1500, height: int = 1100) -> Iterator[Any]:
    """One page on the app in a headless Chromium, closed when the block ends."""
    with browser() as chromium:
        yield open_page(chromium, url, width, height)


def open_page(browser: Any, url: str, width: int = 1500, height: int = 1100) -> Any:
    """A new page in its own browser context (its own Streamlit session) on the app, once the first run is done."""
    page = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True).new_page()
    page.goto(url)
    page.get_by_text("what did the model look at").wait_for(timeout=60_000)
    wait_idle(page)
    return page


def wait_idle(page: Any, timeout: float = 60.0) -> None:
    """Until Streamlit has finished the script run (script state not running, no stale element) for 0.3 s."""
    deadline = time.time() + timeout
    quiet_since = time.time()
    busy = '[data-testid="stApp"][data-test-script-state="running"], [data-stale="true"]'
    while time.time() < deadline:
        if page.locator(busy).count() > 0:
            quiet_since = time.time()
        elif time.time() - quiet_since > 0.3:  # a rerun may start a moment after the action: insist on a quiet spell
            return
        page.wait_for_timeout(30)
    raise TimeoutError("the app kept running")


def upload(page: Any, path: Path) -> None:
    uploader = page.locator('[data-testid="stSidebar"] [data-testid="stFileUploader"]').filter(has_text="DICOM or NIfTI")
    uploader.locator('input[type="file"]').first.set_input_files(str(path))
    wait_idle(page)


def choose(page: Any, label: str, option: str) -> None:
    """Add `option` to the multiselect labelled `label` in the sidebar."""
    box = page.locator('[data-testid="stSidebar"] [data-testid="stMultiSelect"]').filter(has_text=label).first
    box.locator("input").first.click()
    page.keyboard.type(option)
    page.get_by_role("option").filter(has_text=option).first.click()
    page.keyboard.press("Escape")
    page.locator("h1").first.click()  # blur the widget so that its value is sent
    page.wait_for_timeout(300)
    wait_idle(page)


def press_explain(page: Any) -> None:
    page.get_by_role("button", name="Explain", exact=True).click()


def image_sources(page: Any) -> list[str]:
    """A token per picture shown (an <img>'s src, a digest of an overlay's loaded picture), in page order."""
    return page.locator(IMAGE).evaluate_all(_SOURCES)


def wait_images(page: Any, count: int, changed_from: Optional[list[str]] = None, timeout: float = 60.0,
                changed: Optional[int] = None) -> float:
    """Seconds until `count` overlays are shown (with a new source when `changed_from` is given: all of them, or at
    least `changed` of them, for views where an overlay has nothing the change can alter, e.g. a blank map)."""
    t0 = time.perf_counter()
    deadline = t0 + timeout
    need = count if changed is None else changed
    while time.perf_counter() < deadline:
        sources = image_sources(page)
        ready = "loading" not in sources[:count]
        if ready and len(sources) >= count and (changed_from is None or sum(s not in changed_from for s in sources[:count]) >= need):
            loaded = page.locator(IMAGE).evaluate_all(
                "els => els.every(e => e.tagName.toLowerCase() !== 'img' || (e.complete && e.naturalWidth > 0))")
            if loaded:
                return time.perf_counter() - t0
        page.wait_for_timeout(10)
    raise TimeoutError(f"{count} overlays did not appear")


def set_slider(page: Any, label: str, key: str) -> None:
    """Press `key` (e.g. End, Home, ArrowRight) on the slider labelled `label`."""
    slider = page.locator('[data-testid="stSlider"]').filter(has_text=label).first.get_by_role("slider")
    slider.focus()
    page.keyboard.press(key)


def show_view(page: Any, name: str, expect: Optional[str] = None) -> None:
    """Open a result view; `expect`: a text the view shows once drawn."""
    page.locator('[data-testid="stMain"] [role="radiogroup"]').filter(has_text="Ensemble").first.get_by_text(name, exact=True).click()
    if expect:
        page.locator('[data-testid="stMain"]').get_by_text(expect).first.wait_for(timeout=60_000)
    wait_idle(page)


def click_slider(page: Any, label: str, fraction: float) -> None:
    """Click the slider labelled `label` at `fraction` of its track (a single change, as a person drags and lets go)."""
    widget = page.locator('[data-testid="stSlider"]').filter(has_text=label).first
    track = widget.locator('[role="group"] > div').first.bounding_box()
    page.mouse.click(track["x"] + fraction * track["width"], track["y"] + track["height"] / 2)


def add_target(page: Any, name: str) -> None:
    """Add the finding `name` to the first model's 'Explain for' picker."""
    box = page.locator('[data-testid="stMain"] [data-testid="stMultiSelect"]').filter(has_text="Explain for").first
    box.locator("input").first.click()
    page.keyboard.type(name)
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    page.locator("h1").first.click()
    page.wait_for_timeout(300)
    wait_idle(page)


def overlays_shown(page: Any) -> int:
    """How many overlays the page shows now, loaded, with no script run in progress (a check that does not wait)."""
    busy = '[data-testid="stApp"][data-test-script-state="running"], [data-stale="true"]'
    if page.locator(busy).count():
        return 0
    return sum(s.startswith("overlay:") for s in page.locator(OVERLAY).evaluate_all(_SOURCES))


def overlay_picture(page: Any, index: int) -> Any:
    """The picture inside the `index`-th overlay."""
    return page.frame_locator(OVERLAY).nth(index).locator("#picture")


def hover_picture(page: Any, index: int, row: float, col: float, shape: tuple[int, int]) -> str:
    """Move the mouse over picture pixel (row, col) of the `index`-th overlay (a picture of `shape` pixels) and
    return the read-out's text ("" when none appears)."""
    picture = overlay_picture(page, index)
    page.frame_locator(OVERLAY).nth(index).locator('#picture[data-ready="1"]').wait_for(timeout=30_000)  # values read
    picture.scroll_into_view_if_needed()
    box = picture.bounding_box()
    page.mouse.move(box["x"] + (col + 0.5) * box["width"] / shape[1], box["y"] + (row + 0.5) * box["height"] / shape[0])
    label = page.frame_locator(OVERLAY).nth(index).locator("#readout")
    try:
        label.wait_for(state="visible", timeout=10_000)
    except Exception:  # noqa: BLE001 - no read-out: the caller's assertion says so
        return ""
    return label.text_content() or ""


def slider_value(page: Any, label: str) -> float:
    """The value the slider labelled `label` shows now."""
    slider = page.locator('[data-testid="stSlider"]').filter(has_text=label).first.get_by_role("slider")
    return float(slider.input_value())


def mark_overlays(page: Any) -> int:
    """Mark every overlay's document (a reloaded overlay loses its mark); returns how many were marked."""
    return page.locator(OVERLAY).evaluate_all("els => els.map(e => { e.contentWindow.medlensMark = 1; }).length")


def overlays_kept(page: Any, count: int) -> bool:
    """Whether the first `count` overlays are still the documents `mark_overlays` marked (none reloaded)."""
    marks = page.locator(OVERLAY).evaluate_all("els => els.map(e => e.contentWindow.medlensMark === 1)")
    return len(marks) >= count and all(marks[:count])


def canvas_pixels(page: Any, index: int) -> Any:
    """The `index`-th overlay's canvas as drawn (uint8 RGB at the picture's own size)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    url = overlay_picture(page, index).evaluate("c => c.toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


#: in the page: when a control was last changed (a key or a click, in the capture phase: before Streamlit sees it)
_STAMP = """() => { if (!window.medlensInput) { window.medlensInput = 0;
  for (const kind of ['keydown', 'pointerdown']) document.addEventListener(kind,
    () => { window.medlensInput = performance.timeOrigin + performance.now(); }, true); } }"""


def redraw_seconds(page: Any, count: int, action: Any, timeout: float = 30.0) -> float:
    """Seconds from the control change `action()` makes to the frame that shows the last of `count` overlays redrawn
    (each overlay page stamps the animation frame after it draws)."""
    page.evaluate(_STAMP)
    before = page.locator(OVERLAY).evaluate_all("els => els.map(e => (e.contentWindow.medlensDrawn || {}).frame || 0)")
    action()
    deadline = time.time() + timeout
    while time.time() < deadline:
        frames = page.locator(OVERLAY).evaluate_all("els => els.map(e => (e.contentWindow.medlensDrawn || {}).frame || 0)")
        if len(frames) >= count and all(f > b for f, b in zip(frames[:count], before[:count])):
            return (max(frames[:count]) - page.evaluate("() => window.medlensInput")) / 1000.0
        page.wait_for_timeout(10)
    raise TimeoutError(f"{count} overlays were not redrawn")
