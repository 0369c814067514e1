"""Screenshot of the `samadapt serve` page for the README: a trained run's prediction on an image, in Chromium.

    python scripts/serve_screenshot.py --run RUN --image IMAGE.nii.gz --out docs/serve.png [--slice N] [--click X,Y]

Serves the run on a free loopback port, opens IMAGE in Debian's Chromium (Playwright), shows slice N (default: the
middle one) with the automatic prediction, optionally adds one positive click at slice pixel (X, Y), and writes a
palette PNG of the page. Prints the click's round-trip time as the page measured it.
"""

from __future__ import annotations

import argparse
import io
import threading

from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--slice", type=int)
    ap.add_argument("--click", help="X,Y slice pixel of one positive click")
    ap.add_argument("--size", default="1180x760", help="viewport WxH")
    args = ap.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    from samadapt.serve import create_app, load_model

    app = create_app(load_model(run=args.run, device="cpu"))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        thread.join(0.1)
    url = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}/"
    w, h = (int(v) for v in args.size.split("x"))
    idle = "document.getElementById('view').dataset.state === 'idle'"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": w, "height": h})
        page.goto(url)
        page.wait_for_function("window.samadapt.info !== null")
        page.set_input_files("#file", args.image)
        page.wait_for_function(f"{idle} && window.samadapt.mask !== null", timeout=300_000)
        if args.slice is not None:
            page.evaluate(f"document.getElementById('slice').value = {args.slice}")
            page.dispatch_event("#slice", "input")
            page.wait_for_function(f"{idle} && window.samadapt.index === {args.slice}", timeout=300_000)
        if args.click:
            x, y = (float(v) for v in args.click.split(","))
            hh, ww = page.evaluate("window.samadapt.mask.shape")
            box = page.locator("#marks").bounding_box()
            page.mouse.click(box["x"] + box["width"] * (x + 0.5) / ww, box["y"] + box["height"] * (1 - (y + 0.5) / hh))
            page.wait_for_function(f"{idle} && window.samadapt.clicks === 1", timeout=300_000)
            print(f"click round trip (page): {page.evaluate('window.samadapt.lastClickMs'):.0f} ms")
        png = page.screenshot()
        browser.close()
    srv.should_exit = True
    thread.join(10)
    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
