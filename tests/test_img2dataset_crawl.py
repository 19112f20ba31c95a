"""img2dataset as users run it (issue #19 item 6): img2dataset itself crawls a loopback HTTP server, and ingest
takes its webdataset and parquet outputs — the same steps as ``examples/img2dataset/run.sh``.

img2dataset (1.47.0) pulls albumentations, opencv, pandas, wandb...: it lives in a side venv, not in .venv, so
the crawl runs only when ``GROWCLIP_IMG2DATASET`` points at that venv (its folder, its ``bin`` or its
``python``), e.g. after ``make img2dataset-example``::

    GROWCLIP_IMG2DATASET=.venv-img2dataset .venv/bin/pytest tests/test_img2dataset_crawl.py

Without it the crawl is skipped; the offline tests here (the example's site and script) and the hand-built
mirrors of img2dataset's outputs in ``tests/test_ingest_formats.py`` always run.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from data_tools.ingest import ingest
from data_tools.manifest import load_manifest
from tests.helpers import REPO, stage_samples

pytestmark = pytest.mark.usefixtures("restore_root_logging")

EXAMPLE = REPO / "examples" / "img2dataset"


def _make_site() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_site", EXAMPLE / "make_site.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _img2dataset() -> Path | None:
    """The img2dataset executable of the venv ``GROWCLIP_IMG2DATASET`` names (a folder, its bin, its python)."""
    value = os.environ.get("GROWCLIP_IMG2DATASET", "").strip()
    if not value:
        return None
    path = Path(value)
    for candidate in (path / "bin" / "img2dataset", path / "img2dataset", path.parent / "img2dataset"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError(
        f"GROWCLIP_IMG2DATASET={value}: no img2dataset executable in it, its bin or beside it; point it at the "
        "venv `make img2dataset-example` creates (.venv-img2dataset)"
    )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, str]]]]:
    """The example's site served by ``python -m http.server`` on loopback; yields (urls.csv, its rows)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    rows = _make_site().make_site(tmp_path / "site", base)
    urls = tmp_path / "urls.csv"
    urls.write_text(
        "url,caption\n" + "".join(f'{r["url"]},"{r["caption"].replace(chr(34), 2 * chr(34))}"\n' for r in rows)
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path / "site")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield urls, rows
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_example_site_and_script(tmp_path: Path) -> None:
    """Offline: the site has the pictures, the web page and the 404 the crawl expects; run.sh parses."""
    make_site = _make_site()
    rows = make_site.make_site(tmp_path / "site", "http://127.0.0.1:1")
    assert len(rows) == len(make_site.IMAGES) + 2
    assert {p.name for p in (tmp_path / "site").iterdir()} == {*make_site.IMAGES, "page.html"}
    subprocess.run(["bash", "-n", str(EXAMPLE / "run.sh")], check=True)
    assert os.access(EXAMPLE / "run.sh", os.X_OK)


def test_img2dataset_crawl_then_ingest(tmp_path: Path, site: tuple[Path, list[dict[str, str]]]) -> None:
    exe = _img2dataset()
    if exe is None:
        pytest.skip(
            "GROWCLIP_IMG2DATASET is not set: it names the side venv holding img2dataset==1.47.0 (created by "
            "`make img2dataset-example`, e.g. GROWCLIP_IMG2DATASET=.venv-img2dataset)"
        )
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.test_ingest_formats import I2D_SCHEMA

    urls, rows = site
    images = _make_site().IMAGES
    captions = {r["url"]: r["caption"] for r in rows}
    for fmt in ("webdataset", "parquet"):
        out = tmp_path / fmt
        argv = [str(exe), "--url_list", str(urls), "--input_format", "csv", "--url_col", "url"]
        argv += ["--caption_col", "caption", "--output_format", fmt, "--output_folder", str(out)]
        argv += ["--processes_count", "1", "--thread_count", "4", "--image_size", "64", "--timeout", "5"]
        argv += ["--disallowed_header_directives", "[]", "--enable_wandb", "False"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "00000_stats.json").is_file()
        # the hand-built mirror of tests/test_ingest_formats.py has img2dataset's own columns and types
        schema = pq.read_schema(out / "00000.parquet")
        expected = I2D_SCHEMA.append(pa.field("jpg", pa.binary())) if fmt == "parquet" else I2D_SCHEMA
        assert {f.name: f.type for f in schema} == {f.name: f.type for f in expected}

        res = ingest(out, "auto", tmp_path / f"root-{fmt}", shard_size=3)
        assert (res.count, res.records, res.drops) == (len(images), len(rows), {"download_failed": 2}), fmt
        kept = stage_samples(tmp_path / f"root-{fmt}", 1)
        assert {s["meta"]["url"].rsplit("/", 1)[1] for s in kept.values()} == set(images)
        assert all(s["txt"] == captions[s["meta"]["url"]] for s in kept.values())
        (entry,) = load_manifest(tmp_path / f"root-{fmt}")["stages"]
        assert entry["sources"][0]["format"] == "img2dataset" and [s["count"] for s in entry["shards"]] == [3, 2]
