"""Our evaluation against CLIP_benchmark 1.6.2 itself (issue #18), on the same model.

The datasets are written by CLIP_benchmark's own exporter (``webdataset_builder.convert_dataset`` /
``convert_retrieval_dataset``: ``test/{0..n-1}.tar``, ``nshards.txt``, class names, templates,
``dataset_type.txt``; webp by default, png and jpg too). ``clip_benchmark eval`` (its CLI's ``main_eval``:
its webdataset reader, zero-shot classifier, metric functions and JSON dump) then runs OUR model on them,
and ``python -m jobs evaluate --task-dir ...`` must give files of the same names, layout and metrics.

The reference is CLIP_benchmark's code alone, installed without its dependencies by ``make reference`` (part
of ``make test``) into .venv/reference (``GROWCLIP_CLIP_BENCHMARK``), imported over this venv's torch,
numpy, scikit-learn and webdataset. What it imports but does not use here is stubbed when absent
(``requests``: downloads; ``pycocoevalcap``: captioning; ``open_clip``: model loading, our model is handed
in), and its ``accuracy()``, whose ``float()`` of a 1-element array is a TypeError under numpy 2.4, runs
with ``.item()`` instead. Both sides run in float32 (CLIP_benchmark's ``--no_amp``: its CPU autocast would
be bfloat16).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import math
import os
import sys
import tarfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
# the reference's own noise: its exporter's 8 DataLoader workers, its WebDataset without shardshuffle
pytestmark = pytest.mark.filterwarnings(
    "ignore:This DataLoader will create:UserWarning", "ignore:WebDataset\\(shardshuffle:UserWarning"
)
REFERENCE_ENV = "GROWCLIP_CLIP_BENCHMARK"
IMAGE_SIZE, CONTEXT = 16, 16

# module -> attributes of the stubs for what CLIP_benchmark imports at module level but never calls here
_STUBS = {
    "requests": (),
    "pycocoevalcap": (),
    "pycocoevalcap.tokenizer": (),
    "pycocoevalcap.tokenizer.ptbtokenizer": ("PTBTokenizer",),
    "pycocoevalcap.bleu": (),
    "pycocoevalcap.bleu.bleu": ("Bleu",),
    "pycocoevalcap.meteor": (),
    "pycocoevalcap.meteor.meteor": ("Meteor",),
    "pycocoevalcap.rouge": (),
    "pycocoevalcap.rouge.rouge": ("Rouge",),
    "pycocoevalcap.cider": (),
    "pycocoevalcap.cider.cider": ("Cider",),
    "pycocoevalcap.spice": (),
    "pycocoevalcap.spice.spice": ("Spice",),
    "open_clip": ("tokenize", "create_model_and_transforms", "get_tokenizer"),
    "open_clip.tokenizer": ("_tokenizer",),
}


def _accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """CLIP_benchmark's ``zeroshot_classification.accuracy``, its ``float(ndarray)`` as ``.item()`` (numpy 2.4)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).item()) / n for k in topk]


@pytest.fixture(scope="module")
def cb() -> Iterator[types.SimpleNamespace]:
    """CLIP_benchmark's cli, exporter and classification metrics modules (skipped without the reference,
    failing when GROWCLIP_CLIP_BENCHMARK names a folder without it: make test sets it)."""
    ref = Path(os.environ.get(REFERENCE_ENV) or REPO / ".venv" / "reference")
    if not (ref / "clip_benchmark").is_dir():
        if os.environ.get(REFERENCE_ENV):
            pytest.fail(f"{REFERENCE_ENV}={ref} holds no clip_benchmark: run `make reference`", pytrace=False)
        pytest.skip(f"CLIP_benchmark reference not installed in {ref}: run `make reference`")
    import model.tv_guard  # noqa: F401  (its dataset module imports torchvision.datasets, beside the CPU torch)

    stubs = {}
    for name, attrs in _STUBS.items():
        top = name.split(".")[0]
        if top in stubs or (name not in sys.modules and importlib.util.find_spec(top) is None):
            stubs[name] = types.ModuleType(name)
            for attr in attrs:
                setattr(stubs[name], attr, None)
    sys.modules.update(stubs)
    sys.path.insert(0, str(ref))
    try:
        mods = {n: importlib.import_module(f"clip_benchmark.{n}") for n in ("cli", "webdataset_builder")}
        zsc = importlib.import_module("clip_benchmark.metrics.zeroshot_classification")
    finally:
        sys.path.remove(str(ref))
        for name in stubs:
            sys.modules.pop(name, None)
    original = zsc.accuracy
    zsc.accuracy = _accuracy
    yield types.SimpleNamespace(**mods)
    zsc.accuracy = original


class _Items(list):
    """(PIL image, label) pairs with ``classes`` and ``templates``: what CLIP_benchmark's exporter converts."""

    classes: list[str] | None = None
    templates: list[str] | None = None


def _image(rng: np.random.Generator, mode: str) -> Image.Image:
    """A random coloured rectangle on a random background, of a random size (centre-cropped by both readers)."""
    w, h = (int(x) for x in rng.integers(14, 30, size=2))
    colour, fill = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
    img = Image.new("RGB", (w, h), colour)
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    ImageDraw.Draw(img).rectangle((x0, y0, x0 + w // 2, y0 + h // 2), fill=fill)
    return img.convert(mode)


def _export(cb: Any, out: Path, kind: str, n: int, classes: int, fmt: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    items = _Items()
    for i in range(n):
        img = _image(rng, ("RGB", "L", "RGBA")[i % 3] if fmt != "jpg" else ("RGB", "L")[i % 2])
        if kind == "retrieval":
            label: Any = [f"caption {j} of picture {i} in {rng.integers(100)}" for j in range(1 + i % 3)]
        elif kind == "multilabel":
            label = (rng.random(classes) < 0.4).astype(np.float32)
            label[classes - 1] = 0.0  # a class without any positive image: CLIP_benchmark counts its AP as 0
        else:
            label = int(rng.integers(classes))
        items.append((img, label))
    folder = out / f"wds_{kind}_{classes}"
    to_bytes = cb.webdataset_builder.PIL_to_bytes(fmt)
    if kind == "retrieval":
        cb.webdataset_builder.convert_retrieval_dataset(
            items, "test", str(folder), transform=to_bytes, image_format=fmt, max_count=16, verbose=False
        )
    else:
        items.classes = [f"thing number {c}" for c in range(classes)]
        items.templates = ["a photo of a {c}.", "a drawing of the {c}", "{c}"]
        cb.webdataset_builder.convert_dataset(
            items, "test", str(folder), transform=to_bytes, image_format=fmt, max_count=16,
            multilabel=kind == "multilabel", verbose=False,
        )  # fmt: skip
    return folder


def _corpus(tmp: Path) -> Path:
    """A DATA_ROOT with a tokenizer (and no eval/): the datasets come in through --task-dir only."""
    from data_tools.imaging import ImageOptions
    from data_tools.ingest import ingest
    from data_tools.synthetic import make_table_input
    from data_tools.tokenizer import train_tokenizer

    root = tmp / "data"
    ingest(make_table_input(tmp / "pairs", 12, seed=3), "table", root, opts=ImageOptions(image_size=16))
    train_tokenizer(root, vocab_size=300)
    return root


def test_same_metrics_and_files_as_clip_benchmark(
    cb: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_root_logging: None
) -> None:
    from data_tools.eval_sets import preprocess
    from data_tools.loaders import normalize_batch
    from data_tools.tokenizer import load_tokenizer, tokenize
    from jobs.cli import main as jobs_main
    from jobs.engine.checkpoint import FORMAT, VERSION, save_checkpoint
    from model.clip import build_model
    from model.spec import ArchSpec, ImageSpec, SharedSpec, TextSpec

    root = _corpus(tmp_path)
    tok = load_tokenizer(root)
    spec = ArchSpec(
        image=ImageSpec(image_size=IMAGE_SIZE, patch_size=4, width=32, depth=1, heads=2),
        text=TextSpec(vocab_size=tok.get_vocab_size(), context_length=CONTEXT, width=32, depth=1, heads=2),
        shared=SharedSpec(width=32, depth=0, heads=2),
        embed_dim=16,
    )
    model = build_model(spec, seed=1).eval()
    ckpt = tmp_path / "final.pt"
    payload = {"format": FORMAT, "version": VERSION, "spec": spec.to_dict(), "model": model.state_dict(), "step": 0}
    save_checkpoint(payload, ckpt)

    datasets = tmp_path / "datasets"
    dirs = {
        "zeroshot_classification": [
            _export(cb, datasets, "classification", 40, 7, "webp", seed=1),  # 3 shards of <= 16
            _export(cb, datasets, "classification", 20, 4, "webp", seed=2),  # < 5 classes: no top-5
            _export(cb, datasets, "multilabel", 30, 5, "png", seed=3),
        ],
        "zeroshot_retrieval": [_export(cb, datasets, "retrieval", 25, 0, "jpg", seed=4)],
    }
    assert (dirs["zeroshot_classification"][0] / "test" / "nshards.txt").read_text() == "3\n"
    assert (dirs["zeroshot_classification"][2] / "dataset_type.txt").read_text() == "multilabel\n"

    # theirs: `clip_benchmark eval`, with its model loader handing it our model, preprocessing and tokenizer
    theirs = tmp_path / "theirs"
    theirs.mkdir()

    def load_clip(**kw: Any) -> tuple[torch.nn.Module, Any, Any]:
        assert kw["pretrained"] == str(ckpt)
        return model, lambda img: normalize_batch(preprocess(img, IMAGE_SIZE)), lambda t: tokenize(t, CONTEXT, tok)

    monkeypatch.setattr(cb.cli, "load_clip", load_clip)
    for task, folders in dirs.items():
        for folder in folders:
            argv = ["clip_benchmark", "eval", "--dataset", "wds/" + folder.name.removeprefix("wds_")]
            argv += ["--dataset_root", str(folder), "--model", "growclip", "--pretrained", str(ckpt)]
            argv += ["--task", task, "--no_amp", "--num_workers", "0", "--batch_size", "8", "--quiet"]
            argv += ["--recall_k", "1", "5", "10"]
            argv += ["--output", str(theirs / "{dataset}_{pretrained}_{model}_{language}_{task}.json")]
            monkeypatch.setattr(sys, "argv", argv)
            cb.cli.main()

    # ours: python -m jobs evaluate --task-dir ... (several shards, batches that straddle them)
    out = tmp_path / "ours" / "eval.json"
    argv = ["evaluate", "--checkpoint", str(ckpt), "--data-root", str(root), "--out", str(out)]
    argv += ["--set", "eval.batch_size=8", "--set", "eval.retrieval_ks=[1,5,10]"]
    for folder in (d for ds in dirs.values() for d in ds):
        argv += ["--task-dir", str(folder)]
    assert jobs_main(argv) == 0
    ours = out.parent / "clip_benchmark"

    names = sorted(p.name for p in theirs.iterdir())
    assert names == sorted(p.name for p in ours.iterdir()) and len(names) == 4, names
    for name in names:
        a, b = json.loads((theirs / name).read_text()), json.loads((ours / name).read_text())
        assert list(b) == list(a) and {k: b[k] for k in a if k != "metrics"} == {k: a[k] for k in a if k != "metrics"}
        ma, mb = a["metrics"], b["metrics"]
        if "acc5" in ma and math.isnan(ma["acc5"]):  # CLIP_benchmark's NaN below 5 classes: absent in ours
            assert "acc5" not in mb and name.startswith("classification_4_")
            del ma["acc5"]
        assert list(mb) == list(ma), name
        for key, value in ma.items():
            assert mb[key] == value, (name, key, mb[key], value)  # the same float, not just close
    result = json.loads(out.read_text())
    assert result["tasks"]["wds_classification_7"]["count"] == 40 and "acc5" in result["tasks"]["wds_classification_7"]
    assert result["tasks"]["wds_multilabel_5"]["type"] == "multilabel"
    assert result["tasks"]["wds_retrieval_0"]["captions"] == sum(1 + i % 3 for i in range(25))


# --- without the reference: the layout as published, found by its files, read as a stream -----------------------


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(
        buf,
        format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()),
        **({"lossless": True} if fmt == "webp" else {}),
    )
    return buf.getvalue()


def _write_wds(folder: Path, samples: list[dict[str, Any]], maxcount: int = 4, **files: str) -> Path:
    """A dataset as CLIP_benchmark's exporter lays it out: keys s0000000..., %d.tar shards, nshards.txt, text files."""
    (folder / "test").mkdir(parents=True)
    with wds.ShardWriter(str(folder / "test" / "%d.tar"), maxcount=maxcount, verbose=0) as sink:
        for i, sample in enumerate(samples):
            sink.write({"__key__": f"s{i:07d}", **sample})
        shards = sink.shard
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    for name, text in files.items():
        (folder / f"{name}.txt").write_text(text)
    return folder


def _classification(folder: Path, n: int, classes: int, **files: str) -> Path:
    rng = np.random.default_rng(n)
    fmts = ("webp", "png", "jpg", "jpeg")  # every image format CLIP_benchmark reads, in one task
    samples = [{fmts[i % 4]: _encoded(_image(rng, "RGB"), fmts[i % 4]), "cls": i % classes} for i in range(n)]
    texts = {
        "classnames": "".join(f"class {c}\n" for c in range(classes)),
        "zeroshot_classification_templates": "a {c}\n",
    }
    return _write_wds(folder, samples, **{**texts, **files})


def test_tasks_are_found_by_their_files(tmp_path: Path) -> None:
    """CLIP_benchmark datasets dropped into DATA_ROOT/eval or given as task dirs need no tasks.json; the type comes
    from tasks.json (our built sets), else dataset_type.txt, else classification; bad folders are named."""
    from data_tools.eval_sets import find_eval_tasks, write_classification_task

    root, other = tmp_path / "data", tmp_path / "elsewhere"
    entry = write_classification_task(
        root / "eval" / "ours", ["a", "b"], ["{c}"], [(_encoded(Image.new("RGB", (8, 8)), "jpg"), 1)]
    )
    (root / "eval" / "tasks.json").write_text(json.dumps({"tasks": {"ours": entry}}))
    _classification(root / "eval" / "wds_cars", 10, 3)
    rng = np.random.default_rng(0)
    retrieval = [{"webp": _encoded(_image(rng, "RGB"), "webp"), "txt": "one\ntwo"} for _ in range(3)]
    _write_wds(root / "eval" / "wds_flickr", retrieval, dataset_type="retrieval\n")
    (root / "eval" / "notes").mkdir()  # not a dataset: ignored
    multi = [{"png": _encoded(_image(rng, "RGB"), "png"), "npy": np.array([1, 0, 1], dtype=np.float32)}] * 5
    voc = _write_wds(other / "wds_voc", multi, dataset_type="multilabel\n", classnames="x\ny\nz\n",
                     zeroshot_classification_templates="a photo of {c}\n")  # fmt: skip

    tasks = find_eval_tasks(root, [voc, root / "eval" / "wds_cars"])  # a folder of DATA_ROOT/eval again: one task
    assert {n: t.type for n, t in tasks.items()} == {
        "ours": "classification", "wds_cars": "classification", "wds_flickr": "retrieval", "wds_voc": "multilabel",
    }  # fmt: skip
    assert tasks["ours"].count == 1 and tasks["wds_cars"].count is None and len(tasks["wds_cars"].shards) == 3
    assert tasks["wds_voc"].classnames == ("x", "y", "z") and tasks["wds_flickr"].classnames == ()
    assert list(find_eval_tasks(root, [voc], only=["wds_cars"])) == ["wds_cars", "wds_voc"]

    with pytest.raises(ValueError, match=r"eval tasks \['nope'\] not found .*wds_cars"):
        find_eval_tasks(root, only=["nope"])
    with pytest.raises(ValueError, match="two eval tasks are named 'wds_cars'"):
        find_eval_tasks(root, [_classification(other / "wds_cars", 4, 2)])
    (root / "eval" / "ours" / "dataset_type.txt").write_text("retrieval\n")
    with pytest.raises(ValueError, match=r"dataset_type\.txt says 'retrieval' but tasks.json records 'classification'"):
        find_eval_tasks(root, only=["ours"])
    (root / "eval" / "wds_flickr" / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(FileNotFoundError, match=r"counts 3 shards; missing: \['1.tar', '2.tar'\]"):
        find_eval_tasks(root, only=["wds_flickr"])
    for folder, files, message in (
        ("t1", {"zeroshot_classification_templates": "a photo\n"}, "every template needs '{c}'"),
        ("t2", {"dataset_type": "captioning\n"}, "type 'captioning' is not one of"),
    ):
        with pytest.raises(ValueError, match=message):
            find_eval_tasks(None, [_classification(tmp_path / "bad" / folder, 4, 2, **files)])
    (other / "wds_voc" / "classnames.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"classnames\.txt not found"):
        find_eval_tasks(None, [voc])


def test_eval_batches_stream_every_image_format_across_shards(tmp_path: Path) -> None:
    """Batches straddle shards; every image is :func:`decode_image` of its bytes (the one decode), normalised;
    labels come as the type needs them; DataLoader workers share the shards out; a bad label names its sample."""
    from data_tools.eval_sets import decode_image, eval_batches, find_eval_tasks
    from data_tools.loaders import normalize_batch

    cars = _classification(tmp_path / "wds_cars", 10, 3)
    rng = np.random.default_rng(1)
    multi = [
        {"webp": _encoded(_image(rng, "RGBA"), "webp"), "npy": np.eye(3, dtype=np.float32)[i % 3]} for i in range(5)
    ]
    retrieval = [{"jpg": _encoded(_image(rng, "RGB"), "jpg"), "txt": "\n".join(["x"] * (i + 1))} for i in range(5)]
    files = {"classnames": "a\nb\nc\n", "zeroshot_classification_templates": "{c}\n"}
    tasks = find_eval_tasks(None, [
        cars, _write_wds(tmp_path / "voc", multi, dataset_type="multilabel\n", **files),
        _write_wds(tmp_path / "flickr", retrieval, dataset_type="retrieval\n"),
    ])  # fmt: skip
    batches = list(eval_batches(tasks["wds_cars"], 12, 3))
    assert [len(y) for _, y in batches] == [3, 3, 3, 1]  # 3 shards of 4, 4, 2
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert images.shape == (10, 3, 12, 12) and images.dtype == torch.float32 and labels.dtype == torch.long
    assert labels.tolist() == [i % 3 for i in range(10)]
    with tarfile.open(cars / "test" / "0.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}  # type: ignore[union-attr]
    for i, ext in enumerate(("webp", "png", "jpg", "jpeg")):
        assert torch.equal(images[i], normalize_batch(decode_image(members[f"s{i:07d}.{ext}"], 12))), ext
    with_workers = [y for _, y in eval_batches(tasks["wds_cars"], 12, 3, workers=2)]
    assert sorted(torch.cat(with_workers).tolist()) == sorted(labels.tolist())

    (x, y), *_ = eval_batches(tasks["voc"], 12, 8)
    assert x.shape == (5, 3, 12, 12) and torch.equal(y, torch.eye(3)[[0, 1, 2, 0, 1]])
    (x, y), *_ = eval_batches(tasks["flickr"], 12, 8)
    assert y == [["x"] * (i + 1) for i in range(5)]

    (cars / "classnames.txt").write_text("a\nb\n")  # labels go up to 2
    with pytest.raises(ValueError, match=r"eval task wds_cars: sample .*0.tar s0000002.jpg/.cls: label 2 is outside"):
        list(eval_batches(find_eval_tasks(None, [cars])["wds_cars"], 12, 3))


def test_clip_benchmark_files_of_another_checkpoint_are_never_replaced(tmp_path: Path) -> None:
    """CLIP_benchmark names files by the checkpoint's base name: stage 1's final.pt must not overwrite stage 2's."""
    from jobs.engine.clip_benchmark import write_clip_benchmark

    def result(ckpt: str, acc1: float) -> dict:
        row = {"type": "classification", "acc1": acc1, "mean_per_class_recall": acc1}
        return {"weights": "model", "checkpoint": ckpt, "tasks": {"mnist": row}}

    (path,) = write_clip_benchmark(result("/r/stage_01/train/final.pt", 0.5), tmp_path)
    assert write_clip_benchmark(result("/r/stage_01/train/final.pt", 0.6), tmp_path) == [path]  # same: updated
    with pytest.raises(FileExistsError, match=r"another checkpoint \(/r/stage_01/train/final\.pt\)"):
        write_clip_benchmark(result("/r/stage_02/train/final.pt", 0.7), tmp_path)
    assert json.loads(path.read_text())["metrics"]["acc1"] == 0.6
