"""Reliability (issue #10, item 6): bad configs and bad arguments get an error that names the problem.

One table over the verbs of ``python -m jobs`` and ``python -m data_tools``: each case gives the
exit code (2 = bad input; 1 where the job started and an input it was pointed at is unusable) and
substrings the message on stderr must contain (what is wrong, and the fix where there is one), and a
non-zero exit must print exactly ONE `error:` line, the last one, with no traceback (issue #14). The
table runs in-process through each CLI's ``main(argv)`` (the function ``python -m`` calls); two
cases also run as real subprocesses. Nothing here trains a model or writes into the shared corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_tools.cli import main as data_main
from data_tools.ingest import ingest
from jobs.cli import main as jobs_main
from jobs.config import dump_cfg, load_cfg

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("restore_root_logging")


# (cli, argv with {cfg} {data} {tmp} placeholders, exit code, substrings of stderr)
CASES = [
    # --- run config (python -m jobs check-config; every verb loads configs the same way)
    ("jobs", "check-config {tmp}/missing.yaml", 2, ["missing.yaml: config file not found", "configs/demo.yaml"]),
    ("jobs", "check-config {cfg} --set train.lrr=1", 2, ["unknown key 'train.lrr'", "Did you mean 'train.lr'"]),
    ("jobs", "check-config {cfg} --set model.image.heads=3", 2, ["heads=3 must divide image.width=32", "pick heads"]),
    ("jobs", "check-config {cfg} --set train.lr=abc", 2, ["train.lr: got 'abc'", "expected a number"]),
    ("jobs", "check-config {cfg} --set nokey", 2, ["override 'nokey'", "expected section.key=value"]),
    ("jobs", "check-config {cfg} --set train.steps=-5", 2, ["train.steps=-5 must be > 0"]),
    ("jobs", "check-config {cfg} --set data.replay_fraction=1.5", 2, ["data.replay_fraction=1.5 must be in [0, 1]"]),
    ("jobs", "check-config {tmp}/syntax.yaml", 2, ["syntax.yaml: not valid YAML at line 3"]),
    ("jobs", "check-config {tmp}/list.yaml", 2, ["top level must be a mapping of sections, got list"]),
    ("jobs", "check-config {cfg} --set growth.axes=[image_depth,wings]", 2, ["growth.axes[1]: got 'wings'", "one of"]),
    ("jobs", "submit --config {cfg} --run-dir {tmp}/r --set cluster.executor=pbs", 2, ["cluster.executor: got 'pbs'"]),
    # --- train
    ("jobs", "train --config {cfg} --stage 9 --run-dir {tmp}/r", 2, ["--stage 9 must be in 1..data.stages=3"]),
    ("jobs", "train --config {cfg} --stage 0 --run-dir {tmp}/r", 2, ["--stage: expected a positive integer, got 0"]),
    (
        "jobs",
        "train --config {cfg} --stage 1 --run-dir {tmp}/r --set train.batch_size=30 --set train.grad_accum=4",
        2,
        ["train.batch_size=30 must be divisible by train.grad_accum=4"],
    ),
    (
        "jobs",
        "train --config {cfg} --stage 1 --run-dir {tmp}/r --set model.text.vocab_size=64",
        2,
        ["model.text.vocab_size=64", "set --set model.text.vocab_size="],
    ),
    (
        "jobs",
        "train --config {cfg} --stage 1 --run-dir {tmp}/r --set data.root={tmp}/nodata",
        2,
        ["nodata/manifest.json does not exist", "build-offline"],
    ),
    # a checkpoint named on the command line is read by the job itself: exit 1 (the job failed)
    ("jobs", "train --config {cfg} --stage 1 --run-dir {tmp}/r --resume {tmp}/no.pt", 1, ["no.pt: no such checkpoint"]),
    ("jobs", "evaluate --checkpoint {tmp}/no.pt --data-root {data}", 1, ["no.pt: no such checkpoint"]),
    # --- pipeline verbs
    ("jobs", "submit --config {cfg} --run-dir {tmp}/r --stages 5", 2, ["--stages '5'", "within 1..data.stages=3"]),
    ("jobs", "submit --config {cfg} --run-dir {tmp}/r --stages x-y", 2, ["--stages 'x-y': expected e.g. 2-3"]),
    (
        "jobs",
        "plan --config {cfg} --run-dir {tmp}/r --set data.root={tmp}/nodata",
        2,
        ["nodata/manifest.json does not exist", "build-offline"],
    ),
    ("jobs", "plan --config {cfg} --run-dir {tmp}/r --stages 3", 2, ["needs stage 2 train", "include stage 2"]),
    (
        "jobs",
        "search-candidate --config {cfg} --stage 0 --run-dir {tmp}/r --index 0",
        2,
        ["--stage: expected a positive integer"],
    ),
    ("jobs", "select --config {tmp}/missing.yaml --stage 2 --run-dir {tmp}/r", 2, ["config file not found"]),
    ("jobs", "status {tmp}/norun", 2, ["norun/config.yaml does not exist", "not a submitted run"]),
    ("jobs", "submit-train --config {cfg} --stage 1 --run-dir {tmp}/r --executor pbs", 2, ["invalid choice: 'pbs'"]),
    ("jobs", "frobnicate", 2, ["invalid choice: 'frobnicate'", "check-config"]),
    ("jobs", "train --config {cfg} --stage 1", 2, ["required: --run-dir", "python -m jobs train --help"]),
    # --- issue #14: inputs found by a new user's tries
    ("jobs", "check-config {tmp}/dup.yaml", 2, ["key 'train' appears twice (lines 1 and 3)", "keep one"]),
    ("jobs", "check-config {tmp}/latin1.yaml", 2, ["latin1.yaml: not UTF-8 text (byte 0xe9 at line 2", "save"]),
    ("jobs", "check-config {tmp}", 2, ["config file not found"]),
    ("jobs", "check-config {cfg} --set train.lr=[1", 2, ["value '[1' is not valid YAML"]),
    ("jobs", "check-config {cfg} --set model.text.context_length=1", 2, ["context_length=1", "at least 2"]),
    ("jobs", "train --config {cfg} --stage 1 --run-dir {tmp}/afile", 2, ["--run-dir is not a directory", "afile"]),
    ("jobs", "submit --config {cfg} --run-dir {tmp}/afile", 2, ["--run-dir is not a directory", "afile"]),
    (
        "jobs",
        "train --config {cfg} --stage 4 --run-dir {tmp}/r --set data.stages=4",
        2,
        ["corpus lacks stages [4] (it has [1, 2, 3])", "manifest.json", "ingest them"],
    ),
    (
        "jobs",
        "plan --config {cfg} --run-dir {tmp}/r --set data.root={tmp}/truncated",
        2,
        ["truncated/manifest.json"],
    ),
    (
        "jobs",
        "plan --config {cfg} --run-dir {tmp}/r --set data.root={tmp}/emptystage --set data.stages=4",
        2,
        ["stage 4 of the corpus holds no pairs", "--repair"],
    ),
    (
        "jobs",
        "train --config {cfg} --stage 4 --run-dir {tmp}/r --set data.root={tmp}/emptystage --set data.stages=4",
        2,
        ["stage 4 of the corpus holds no pairs"],
    ),
    # a run dir belongs to the config it was made with (RUN_DIR/config.yaml: here train.steps=41)
    ("jobs", "train --config {cfg} --stage 1 --run-dir {tmp}/owned", 2, ["another config: train.steps: 41 -> 40"]),
    ("jobs", "plan --config {cfg} --run-dir {tmp}/owned", 2, ["another config: train.steps: 41 -> 40", "--run-dir"]),
    ("jobs", "submit --config {cfg} --run-dir {tmp}/owned", 2, ["another config: train.steps: 41 -> 40"]),
    ("jobs", "submit-train --config {cfg} --stage 1 --run-dir {tmp}/owned", 2, ["train.steps: 41 -> 40"]),
    (
        "jobs",
        "evaluate --checkpoint {tmp}/no.pt --data-root {data} --out {tmp}/owned/stage_01/eval/m.json "
        "--set eval.batch_size=8",
        2,
        ["other eval settings: eval.batch_size: 256 -> 8", "--out outside the run dir"],
    ),
    (
        "jobs",
        "evaluate --checkpoint {tmp}/owned/stage_02/train/final.pt --data-root {data} --out "
        "{tmp}/owned/stage_01/eval/m.json",
        2,
        ["--checkpoint is of another run or stage", "stage_02", "--out outside the run dir"],
    ),
    (
        "jobs",
        "evaluate --checkpoint {tmp}/no.pt --data-root {data} --out {tmp}/owned/stage_01/eval/m.json --weights ema",
        2,
        ["--weights ema into a run dir", "trained weights"],
    ),
    ("jobs", "select --config {cfg} --stage 1 --run-dir {tmp}/r", 2, ["--stage 1 must be in 2..data.stages=3"]),
    ("jobs", "search-candidate --config {cfg} --stage 2 --run-dir {tmp}/r --index -1", 2, ["--index -1 must be >= 0"]),
    # --- data tools
    ("data", "ingest --input {tmp}/none.jsonl --format table --data-root {tmp}/d", 2, ["none.jsonl does not exist"]),
    ("data", "ingest --input {tmp}/t.jsonl --format csv --data-root {tmp}/d", 2, ["--format: invalid choice: 'csv'"]),
    (
        "data",
        "ingest --input {tmp}/t.jsonl --format table --data-root {tmp}/d --jpeg-quality 0",
        2,
        ["jpeg_quality=0 must be in 1..100"],
    ),
    (
        "data",
        "ingest --input {tmp}/t.jsonl --format table --data-root {tmp}/d --resize-mode stretch",
        2,
        ["--resize-mode: invalid choice: 'stretch'"],
    ),
    ("data", "ingest --input {tmp}/t.jsonl --format table --data-root {tmp}/d --shard-size 0", 2, ["--shard-size 0"]),
    (
        "data",
        "ingest --input {tmp}/t.jsonl --format table --data-root {tmp}/d --image-size abc",
        2,
        ["--image-size: invalid int value: 'abc'"],
    ),
    (
        "data",
        "ingest --input {tmp}/t.jsonl --format table --data-root {data} --stage 1",
        2,
        ["stage 1 already exists", "append-only", "omit --stage"],
    ),
    ("data", "validate {tmp}/nodata", 2, ["nodata/manifest.json does not exist", "build-offline"]),
    ("data", "stats {tmp}/nodata", 2, ["nodata/manifest.json does not exist"]),
    ("data", "build-offline {tmp}/d2 --stages 2", 2, ["--stages 2", "at least 3 stages"]),
    ("data", "train-tokenizer {tmp}/nodata", 2, ["nodata/manifest.json does not exist"]),
    ("data", "train-tokenizer {data} --vocab-size 3", 2, ["--vocab-size 3 is too small", ">= 260"]),
    ("data", "frobnicate", 2, ["invalid choice: 'frobnicate'", "ingest"]),
    # --- issue #14: inputs as a whole are refused before anything is written; a run that keeps nothing exits 1
    ("data", "ingest --input {tmp}/nocol.jsonl --format table --data-root {tmp}/d", 2, ["lack caption column"]),
    (
        "data",
        "ingest --input {tmp}/t.jsonl --format table --data-root {tmp}/d",
        1,
        ["stage 1 not written: 0 of 1 pairs kept", "missing_file=1", "nothing was appended"],
    ),
    ("data", "ingest --input {tmp}/empty.jsonl --format table --data-root {tmp}/d", 1, ["the input has no pairs"]),
    (
        "data",
        "ingest --input {tmp}/good.jsonl --format table --data-root {tmp}/gooddata --image-size 32",
        1,
        ["0 of 1 pairs kept", "duplicate_across_stages=1", "already in an earlier stage"],
    ),
    (
        "data",
        "ingest --input {tmp}/t.jsonl --format table --data-root {tmp}/d --max-file-bytes 0",
        2,
        ["max_file_bytes=0 must be >= 1"],
    ),
    (
        "data",
        "ingest --input {tmp}/fifo.jsonl --format table --data-root {tmp}/d",
        2,
        ["fifo.jsonl is a FIFO", "--input must be a regular file"],
    ),
    ("data", "ingest --input {tmp}/emptydir --format table --data-root {tmp}/d", 2, ["no .csv/.tsv/.jsonl/.parquet"]),
    ("data", "ingest --input {tmp}/emptydir --format img2dataset --data-root {tmp}/d", 2, ["not an img2dataset"]),
    ("data", "ingest --input {tmp}/t.jsonl --format img2dataset --data-root {tmp}/d", 2, ["not a readable tar"]),
    ("data", "ingest --input {tmp}/bad.parquet --format table --data-root {tmp}/d", 2, ["not a readable parquet"]),
    ("data", "ingest --input {tmp}/t.txt --format table --data-root {tmp}/d", 2, ["unknown table type '.txt'"]),
    ("data", "ingest --input {tmp}/t.jsonl --format table --data-root {tmp}/afile", 2, ["is not a directory"]),
    ("data", "validate {tmp}/truncated", 2, ["truncated/manifest.json is not valid JSON", "restore it"]),
    ("data", "stats {tmp}/truncated", 2, ["truncated/manifest.json is not valid JSON"]),
    ("data", "validate {tmp}/list", 2, ["is not a GrowCLIP manifest"]),
    ("data", "validate {tmp}/emptystage", 1, ["validate {tmp}/emptystage --repair"]),
    ("data", "ingest --input {tmp}/t.jsonl --format table", 2, ["required: --data-root", "data_tools ingest --help"]),
]


@pytest.fixture(scope="module")
def inputs(tiny_config: Path, tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("cli_errors")
    (tmp / "syntax.yaml").write_text("train:\n  lr: [1\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "t.jsonl").write_text('{"caption": "x", "image": "none.png"}\n')
    (tmp / "dup.yaml").write_text("train:\n  lr: 1.0e-3\ntrain:\n  steps: 5\n")
    (tmp / "latin1.yaml").write_bytes("train:\n  # caf\u00e9\n  lr: 1.0e-3\n".encode("latin-1"))
    (tmp / "afile").write_text("not a directory\n")
    owned = tmp / "owned"
    owned.mkdir()
    (owned / "config.yaml").write_text(dump_cfg(load_cfg(tiny_config, ["train.steps=41"])))
    for name in ("truncated", "emptystage"):
        shutil.copytree(tiny_corpus, tmp / name, ignore=shutil.ignore_patterns("shards", "eval"))
    text = (tiny_corpus / "manifest.json").read_text()
    (tmp / "truncated" / "manifest.json").write_text(text[: len(text) // 2])
    manifest = json.loads(text)
    (tmp / "list").mkdir()
    (tmp / "list" / "manifest.json").write_text("[1, 2]\n")
    (tmp / "nocol.jsonl").write_text('{"text": "x", "image": "none.png"}\n')
    (tmp / "empty.jsonl").write_text("")
    os.mkfifo(tmp / "fifo.jsonl")
    (tmp / "emptydir").mkdir()
    (tmp / "bad.parquet").write_bytes(b"not parquet at all" * 10)
    (tmp / "t.txt").write_text("caption,image\n")
    Image.new("RGB", (16, 16), (200, 30, 90)).save(tmp / "good.png")
    (tmp / "good.jsonl").write_text('{"caption": "a red square", "image": "good.png"}\n')
    ingest(tmp / "good.jsonl", "table", tmp / "gooddata")
    manifest["stages"].append({**manifest["stages"][-1], "stage": 4, "count": 0, "shards": []})
    (tmp / "emptystage" / "manifest.json").write_text(json.dumps(manifest))
    return {"cfg": str(tiny_config), "data": str(tiny_corpus), "tmp": str(tmp)}


def _argv(template: str, inputs: dict[str, str]) -> list[str]:
    return [part.format(**inputs) for part in template.split()]


@pytest.mark.parametrize(("cli", "argv", "code", "needles"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_bad_input_names_the_problem(  # type: ignore[no-untyped-def]
    cli: str, argv: str, code: int, needles: list[str], inputs: dict[str, str], capsys
) -> None:
    main = jobs_main if cli == "jobs" else data_main
    try:
        rc = main(_argv(argv, inputs))
    except SystemExit as exc:  # argparse: usage errors exit 2 from parse_args
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, f"exit {rc}, expected {code}; stderr:\n{err[-2000:]}"
    for needle in needles:
        assert needle.format(**inputs) in err, f"{needle!r} not in stderr:\n{err[-2000:]}"
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), f"not ONE error line:\n{err[-2000:]}"
    assert err.rstrip().splitlines()[-1] == errors[0], f"the error line is not the last:\n{err[-2000:]}"


@pytest.mark.parametrize(
    ("module", "argv", "needle"),
    [
        ("jobs", "check-config {cfg} --set train.lrr=1", "Did you mean 'train.lr'"),
        ("data_tools", "ingest --input {tmp}/t.jsonl --format table --data-root {tmp}/d --jpeg-quality 0", "1..100"),
    ],
)
def test_python_dash_m_exit_code(module: str, argv: str, needle: str, inputs: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, *_argv(argv, inputs)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
