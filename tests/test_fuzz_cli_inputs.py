"""Fuzz (issue #14 item 6): generated bad configs and calls of ``python -m jobs`` end in ONE error line.

Each case is drawn from a seeded generator over the input CLASSES a user produces: a config file whose
bytes are damaged (truncated, an invalid UTF-8 byte, a line duplicated, a section twice), a value of the
wrong type or range at any key (``--set``), a key misspelt, a stage outside the plan, a run dir that is a
file. Invariants: the verb exits 0, 1 or 2, never raises, and a non-zero exit prints exactly one
``error:`` line, last, with no traceback; and a config that passes the check can run: its model builds
and takes a forward pass with its tokenizer's rows, and its batch sizes divide (issue #14: "values that
pass the config check must be able to run"). ``make test`` runs the fixed seeds; ``make fuzz`` new ones
(``GROWCLIP_FUZZ_SEED=random``); a failure prints the seed and the case (replay: GROWCLIP_FUZZ_SEED=N).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from jobs.cli import main as jobs_main
from jobs.config import ConfigError, load_cfg
from model.structs import to_dict
from tests.helpers import seeds_from_env

pytestmark = pytest.mark.usefixtures("restore_root_logging")

SEEDS = seeds_from_env("GROWCLIP_FUZZ_SEED", [20261201, 7])
CASES_PER_SEED = 60
VALUES = ["-1", "0", "1", "2", "3", "7", "1000000000", "0.5", "-0.5", "1e-4", ".nan", ".inf", "abc", "''", "null"]
VALUES += ["true", "[1, 2]", "[]", "{a: 1}", "[image_depth, wings]", "auto", "slurm", "'\\u00e9'"]


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: x for key, v in obj.items() for k, x in _leaves(v, f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj}


def _damaged_yaml(rng: random.Random, text: str) -> bytes:
    data = text.encode()
    kind = rng.choice(["truncate", "byte", "dup_line", "dup_section", "indent", "tab"])
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "byte":
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.choice([0xFF, 0xC3, 0x80, 0xE9, 0x00])]) + data[i:]
    lines = text.splitlines(keepends=True)
    i = rng.randrange(len(lines))
    if kind == "dup_line":
        lines.insert(i, lines[i])
    elif kind == "dup_section":
        lines.append(rng.choice([ln for ln in lines if not ln[0].isspace()]))
    elif kind == "indent":
        lines[i] = "   " + lines[i]
    else:
        lines[i] = lines[i].replace("  ", "\t", 1)
    return "".join(lines).encode()


def _case(rng: random.Random, cfg_path: Path, keys: dict[str, Any], tmp: Path, n: int) -> list[str]:
    """One generated argv (files it needs are written under ``tmp``)."""
    numeric = sorted(k for k, v in keys.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    keys = sorted(keys)  # type: ignore[assignment]
    cls = rng.choice(["yaml", "value", "plausible", "plausible", "typo", "stage", "run_dir"])
    config = str(cfg_path)
    sets: list[str] = []
    if cls == "yaml":
        bad = tmp / f"case{n}.yaml"
        bad.write_bytes(_damaged_yaml(rng, cfg_path.read_text()))
        config = str(bad)
    elif cls in ("value", "stage", "run_dir"):
        for _ in range(rng.randint(1, 2)):
            sets.append(f"{rng.choice(keys)}={rng.choice(VALUES)}")
    elif cls == "plausible":  # small numbers in numeric fields: often valid, so "passes => runs" is exercised
        for _ in range(rng.randint(1, 3)):
            sets.append(f"{rng.choice(numeric)}={rng.choice(['1', '2', '3', '4', '8', '16', '0.25'])}")
    else:
        key = rng.choice(keys)
        i = rng.randrange(len(key))
        sets.append(f"{key[:i]}{rng.choice('xqz_.')}{key[i + 1 :]}=1")
    set_args = [a for s in sets for a in ("--set", s)]
    verb = rng.choice(["check-config", "check-config", "plan", "train", "select"])
    if cls == "stage":
        verb = rng.choice(["train", "select", "search-candidate"])
    run_dir = tmp / f"run{n}"
    if cls == "run_dir":
        run_dir.write_text("a file where a run dir should be\n")
    stage = str(rng.choice([0, 1, 2, 3, 4, 99, -1])) if cls == "stage" else "9"
    if verb == "check-config":
        return ["check-config", config, *set_args]
    if verb == "plan":
        return ["plan", "--config", config, "--run-dir", str(run_dir), *set_args]
    if verb == "search-candidate":
        return ["search-candidate", "--config", config, "--stage", stage, "--run-dir", str(run_dir), "--index", "-1"]
    # train/select are only drawn with a stage outside the plan (9) or a random one: never a real training
    if verb == "train" and stage in ("1", "2", "3"):
        stage = "4"
    args = ["--config", config, "--stage", stage, "--run-dir", str(run_dir)]
    return [verb, *args, *(set_args if verb == "train" else [])]


def _runs(config: Path, overrides: list[str], corpus: Path) -> None:
    """What a config that passed the check must allow: build the model, a forward pass, the batch split."""
    from data_tools.tokenizer import tokenize
    from jobs.engine.dist import DistEnv
    from jobs.engine.trainer import _batching
    from model import build_model

    cfg = load_cfg(config, overrides)
    if cfg.model.params() > 5e6:  # valid but too big for this test machine: the check is about validity
        return
    _batching(cfg.train, DistEnv())
    model = build_model(cfg.model).eval()
    size = cfg.model.image.image_size
    tok = cfg.data.root / "tokenizer.json"
    if not tok.exists():  # data.root moved elsewhere: plan/train check that corpus; tokenize with the test's
        tok = corpus / "tokenizer.json"
    tokens = tokenize(["a photo", "two words"], cfg.model.text.context_length, tok)
    with torch.no_grad():
        model(torch.zeros(2, 3, size, size), tokens)


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_bad_calls_end_in_one_error_line(seed: int, tiny_config: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    print(f"fuzz seed {seed} (replay: GROWCLIP_FUZZ_SEED={seed})")
    rng = random.Random(seed)
    keys = _leaves(to_dict(load_cfg(tiny_config)))
    codes: dict[int, int] = {}
    for n in range(CASES_PER_SEED):
        argv = _case(rng, tiny_config, keys, tmp_path, n)
        capsys.readouterr()
        try:
            rc = jobs_main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
        err = capsys.readouterr().err
        where = f"seed {seed} case {n}: python -m jobs {' '.join(argv)}\n{err[-1500:]}"
        assert rc in (0, 1, 2), f"exit {rc}: {where}"  # 1: a job that ran and failed (e.g. select before training)
        assert "Traceback" not in err, where
        codes[rc] = codes.get(rc, 0) + 1
        if rc:
            errors = [line for line in err.splitlines() if "error:" in line]
            assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], f"not one error line: {where}"
            continue
        if argv[0] in ("check-config", "plan"):
            config = Path(argv[1] if argv[0] == "check-config" else argv[2])
            overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            try:
                _runs(config, overrides, load_cfg(tiny_config).data.root)
            except ConfigError as exc:  # pragma: no cover - would be a failure below
                raise AssertionError(f"passed the check but cannot run ({exc}): {where}") from exc
            except Exception as exc:
                raise AssertionError(f"passed the check but cannot run ({type(exc).__name__}: {exc}): {where}") from exc
    print(f"fuzz seed {seed}: {CASES_PER_SEED} cases, exit codes {codes}")
    assert codes.get(2, 0) > CASES_PER_SEED // 3  # the generator does produce bad inputs
    assert codes.get(0, 0) >= 1  # and valid ones, whose "passes => runs" is checked
