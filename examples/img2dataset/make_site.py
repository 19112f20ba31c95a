"""The site ``run.sh`` crawls: a few generated JPEG/PNG images, a page that is not an image, and a URL that 404s.

``python make_site.py SITE_DIR BASE_URL > urls.csv`` writes the files into SITE_DIR and img2dataset's input
(``--input_format csv --url_col url --caption_col caption``) on stdout. ``tests/test_img2dataset_crawl.py``
imports ``make_site``.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image, ImageDraw

# file name -> (shape, colour, caption); sizes differ too, so no image is a duplicate of another
IMAGES = {
    "red-square.jpg": ("rectangle", "red", "a red square on a white background"),
    "blue-disc.png": ("ellipse", "blue", "a blue disc, drawn with Pillow"),
    "green-bar.jpg": ("rectangle", "green", 'a green bar, "wide" and flat'),
    "grey-cross.png": ("line", "grey", "a grey cross"),
    "yellow-dot.jpg": ("ellipse", "yellow", "a small yellow dot in the corner"),
}
NOT_AN_IMAGE = {"page.html": "a web page, not an image"}  # served as text/html: img2dataset cannot decode it
MISSING = {"gone.jpg": "a picture that is not there (404)"}  # never written


def _draw(shape: str, colour: str, i: int) -> Image.Image:
    img = Image.new("RGB", (48 + 16 * i, 40 + 8 * i), "white")
    draw = ImageDraw.Draw(img)
    box = (8, 8, img.width - 8, img.height - 8)
    if shape == "line":
        draw.line([box[:2], box[2:]], fill=colour, width=6)
    else:
        getattr(draw, shape)(box, fill=colour)
    return img


def make_site(site: Path, base_url: str) -> list[dict[str, str]]:
    """Write the site into ``site``; return img2dataset's input rows (``url``, ``caption``)."""
    site.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i, (name, (shape, colour, caption)) in enumerate(IMAGES.items()):
        _draw(shape, colour, i).save(site / name)
        captions[name] = caption
    (site / "page.html").write_text("<!doctype html><title>not an image</title><p>hello</p>\n")
    captions |= NOT_AN_IMAGE | MISSING
    return [{"url": f"{base_url}/{name}", "caption": caption} for name, caption in captions.items()]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python make_site.py SITE_DIR BASE_URL > urls.csv", file=sys.stderr)
        return 2
    rows = make_site(Path(argv[0]), argv[1].rstrip("/"))
    writer = csv.DictWriter(sys.stdout, fieldnames=["url", "caption"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
