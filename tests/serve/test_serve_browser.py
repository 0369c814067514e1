"""End to end in a real browser: Debian's Chromium driven by Playwright against `samadapt serve` on the tiny
backbone. Load a generated NIfTI, see the overlay, click, see the mask change, undo, draw a box, propagate, download
the mask and check its geometry; a broken file shows its message in the page.

Needs ``/usr/bin/chromium`` (package ``chromium``, installed by scripts/setup.sh) and the ``playwright`` package; the
test is skipped, with the reason, only when either is missing."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from samadapt.config.run_config import load_config
from samadapt.serve import create_app, load_model
from support import write_phantom

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it as root with apt)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)  # Playwright gives it an empty profile folder
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`samadapt serve`'s app on the tiny backbone, served by uvicorn on a free loopback port in a thread."""
    import uvicorn

    model = load_model(config=load_config("box_prompt_whole", ["backbone.name=tiny"]), device="cpu")
    app = create_app(model, workdir=tmp_path_factory.mktemp("serve-work"))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        thread.join(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield app, f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(10)


def overlay_pixels(page) -> int:
    """Pixels the overlay canvas actually paints (alpha > 0)."""
    return page.evaluate("""() => { const c = document.getElementById('overlay');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")


def wait_idle(page, condition: str = "true") -> None:
    page.wait_for_function(f"document.getElementById('view').dataset.state === 'idle' && ({condition})")


def test_load_overlay_click_undo_download(browser, server, tmp_path):
    app, url = server
    src = write_phantom(tmp_path / "phantom.nii.gz")  # 12 x 40 x 48, rotated direction, anisotropic spacing
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("window.samadapt.info !== null")
    assert "box-prompt" in page.text_content("#status") and "tiny" in page.text_content("#status")

    page.set_input_files("#file", str(src))
    wait_idle(page, "window.samadapt.mask !== null")
    session = app.state.sessions[page.evaluate("window.samadapt.session.id")]
    assert page.evaluate("window.samadapt.index") == 6 and page.text_content("#slice-label") == "7 / 12"
    before = session.mask[6].copy()
    assert before.any(), "the tiny model's automatic mask of this slice should not be empty"
    assert overlay_pixels(page) == int((before > 0).sum()) == int(page.get_attribute("#view", "data-mask-nonzero"))

    box = page.locator("#marks").bounding_box()  # volumes are drawn with their first row at the bottom
    page.mouse.click(box["x"] + box["width"] * 12.5 / 48, box["y"] + box["height"] * (1 - 29.5 / 40))
    wait_idle(page, "window.samadapt.clicks === 1")
    assert session.prompts[(0, 6, 1)].points == [(12.0, 29.0, True)]
    after = session.mask[6].copy()
    assert (after != before).mean() > 0.01, "the click should change the mask"
    assert overlay_pixels(page) == int((after > 0).sum())
    assert "last prompt" in page.text_content("#status")

    page.click("#undo")
    wait_idle(page, f"window.samadapt.mask.data.reduce((n, v) => n + (v > 0), 0) === {int((before > 0).sum())}")
    np.testing.assert_array_equal(session.mask[6], before)

    page.click("#marks", button="right", position={"x": box["width"] * 0.5, "y": box["height"] * 0.5})
    wait_idle(page, "window.samadapt.clicks === 2")
    assert session.prompts[(0, 6, 1)].points == [(24.0, 20.0, False)]

    page.check("#tools input[value=box]")

    def at(x: int, y: int) -> tuple[float, float]:  # the screen point of slice pixel (x, y), rows drawn bottom-up
        return box["x"] + box["width"] * (x + 0.5) / 48, box["y"] + box["height"] * (1 - (y + 0.5) / 40)

    page.mouse.move(*at(10, 8))
    page.mouse.down()
    page.mouse.move(*at(20, 14))
    page.mouse.move(*at(30, 30))
    page.mouse.up()
    wait_idle(page, "window.samadapt.clicks === 3")
    assert session.prompts[(0, 6, 1)].box == (10, 8, 30, 30)
    assert page.evaluate("window.samadapt.prompts.box") == [10, 8, 30, 30]
    assert session.mask[6].any()
    page.click("#propagate")  # the boxed result carried to the neighbouring slices
    wait_idle(page, "window.samadapt.jobs === 1")
    assert session.done[5].all() and session.done[7].all() and page.text_content("#message") == ""

    page.select_option("#axis", "2")  # sagittal: Z x Y slices
    wait_idle(page, "window.samadapt.axis === 2 && window.samadapt.index === 24")
    assert page.text_content("#slice-label") == "25 / 48"
    assert page.evaluate("[document.getElementById('image').width, document.getElementById('image').height]") == [40, 12]
    assert overlay_pixels(page) == int((session.mask[:, :, 24] > 0).sum())
    level = page.input_value("#level")
    page.select_option("#preset", "-600,1500")  # CT lung preset
    assert (page.input_value("#level"), page.input_value("#width")) == ("-600.0", "1500") and level != "-600.0"
    with page.expect_download() as info:
        page.click("#download")
    saved = tmp_path / "downloaded.nii.gz"
    info.value.save_as(saved)
    assert info.value.suggested_filename == "phantom_mask.nii.gz"
    out, ref = sitk.ReadImage(str(saved)), sitk.ReadImage(str(src))
    assert out.GetSize() == ref.GetSize() and out.GetSpacing() == ref.GetSpacing()
    assert out.GetOrigin() == ref.GetOrigin() and out.GetDirection() == ref.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), session.mask)
    assert errors == []
    page.close()


def test_broken_file_shows_its_message(browser, server):
    app, url = server
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("window.samadapt.info !== null")
    page.set_input_files("#file", files=[{"name": "broken.nii.gz", "mimeType": "application/gzip",
                                          "buffer": b"not a volume"}])
    page.wait_for_function("document.getElementById('view').dataset.state === 'error'")
    assert page.text_content("#message").startswith("broken.nii.gz: ")
    assert page.evaluate("window.samadapt.session") is None
    page.close()
