"""Growth on autopilot: the inbox, its crawls, the data-aware trigger and what the autopilot remembers (issue #20).

Our design; a poll is ``jobs/autopilot_poll.py``, the command and the recurring job ``jobs/autopilot.py``. Everything
here is plain file and arithmetic work, testable without a cluster.

* **A crawl** is a folder directly under ``autopilot.inbox`` (img2dataset's output folder, or a folder of tables and
  their images; names starting with ``.`` or ``_`` are skipped, so a crawler can write ``_tmp_xyz`` first). It is
  *complete* once ``autopilot.marker`` (``_SUCCESS``) is in it, or, with ``autopilot.quiet_s`` > 0, once nothing in it
  changed (names, sizes, mtimes) for that long.
* **Once, by content**: a complete crawl's id is a sha256 over its files (relative names and contents, the marker
  left out). A crawl whose content was ingested before (the same folder again, or a copy under another name) is not
  ingested again; a folder whose content changes after its ingest is a new crawl.
* **The trigger**: with ``base`` the pairs of the corpus's stages and ``new`` the pairs of the crawls ingested since,
  a stage is made when ``new >= min_pairs`` and ``(base + new) / base >= min_growth`` (any ``new >= min_pairs`` when
  the corpus is empty) — the ratio the growth space's budget follows (DESIGN.md step 1).

State: ``RUN_DIR/autopilot/state.json`` (written atomically after every action, so a poll killed at any point is
repeated by the next without doing anything twice) and ``events.jsonl`` (one decision a line, appended and fsynced).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_json
from jobs.config import AutopilotCfg
from jobs.engine.rundir import AutopilotDir, read_json

__all__ = [
    "STATE_VERSION",
    "Events",
    "Trigger",
    "crawl_content_id",
    "crawl_folders",
    "crawl_signature",
    "is_complete",
    "load_state",
    "pending_pairs",
    "retry_spent_crawls",
    "save_state",
    "trigger",
    "status_lines",
    "autopilot_stages",
]

STATE_VERSION = 1
_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------------------ state
def load_state(ad: AutopilotDir) -> dict[str, Any]:
    """RUN_DIR/autopilot/state.json, or a fresh state.

    Raises:
        ValueError: the file is not a state of this version (its path and the fix named).
    """
    state = read_json(ad.state_json)
    if state is None:
        return {"version": STATE_VERSION, "crawls": {}, "stages": {}, "in_flight": None, "paused": None}
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(
            f"{ad.state_json} is not an autopilot state of version {STATE_VERSION}; move it away to start the "
            "autopilot's memory over (crawls already in DATA_ROOT's stages are then recognised by their content)"
        )
    return state


def save_state(ad: AutopilotDir, state: dict[str, Any]) -> None:
    ad.path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ad.state_json, state)


class Events:
    """RUN_DIR/autopilot/events.jsonl: ``{"time", "event", ...}`` a line, flushed and fsynced as written."""

    def __init__(self, ad: AutopilotDir) -> None:
        self.path = ad.events_jsonl

    def __call__(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": round(time.time(), 3), "event": event, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return record

    def read(self) -> list[dict[str, Any]]:
        """Every event so far (a line cut short by a crash is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


# ------------------------------------------------------------------------------------------------------ crawls
def crawl_folders(inbox: Path) -> list[Path]:
    """The crawl folders of the inbox, sorted by name (``.``/``_``-prefixed names are not crawls yet)."""
    return sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _files(crawl: Path, marker: str) -> list[Path]:
    return sorted(p for p in crawl.rglob("*") if p.is_file() and p.name != marker)


def crawl_signature(crawl: Path, marker: str) -> str:
    """A cheap fingerprint of the folder (relative names, sizes, mtimes): what ``quiet_s`` watches."""
    h = hashlib.sha256()
    for p in _files(crawl, marker):
        st = p.stat()
        h.update(f"{p.relative_to(crawl)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def crawl_content_id(crawl: Path, marker: str) -> str:
    """sha256 over the folder's files (relative names and contents, streamed; the marker left out)."""
    h = hashlib.sha256(b"growclip-crawl-v1\0")
    for p in _files(crawl, marker):
        h.update(str(p.relative_to(crawl)).encode("utf-8", "surrogateescape") + b"\0")
        with open(p, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def is_complete(crawl: Path, cfg: AutopilotCfg, entry: dict[str, Any], now: float) -> str | None:
    """Why the crawl is complete (``"marker"`` or ``"quiet"``), or None. ``entry`` holds the crawl's last signature
    (``sig``) and since when it holds (``sig_since``); both are updated here."""
    if (crawl / cfg.marker).is_file():
        return "marker"
    if cfg.quiet_s <= 0:
        return None
    sig = crawl_signature(crawl, cfg.marker)
    if entry.get("sig") != sig:
        entry["sig"], entry["sig_since"] = sig, now
        return None
    if not _files(crawl, cfg.marker):
        return None  # an empty folder is a crawl that has not started
    return "quiet" if now - entry["sig_since"] >= cfg.quiet_s else None


# ------------------------------------------------------------------------------------------------------ trigger
@dataclass(frozen=True)
class Trigger:
    """The trigger's reading: ``fire`` and the numbers it was decided on."""

    fire: bool
    base: int  # pairs in the corpus's stages
    new: int  # pairs of the crawls waiting for a stage
    ratio: float | None  # (base + new) / base; None for an empty corpus
    why: str


def pending_pairs(state: dict[str, Any]) -> tuple[list[str], int]:
    """The crawls ingested but in no stage yet (oldest first), and their pairs."""
    ids = [cid for cid, c in state["crawls"].items() if c.get("status") == "staged" and c.get("stage") is None]
    ids.sort(key=lambda cid: state["crawls"][cid].get("ingested", 0))
    return ids, sum(int(state["crawls"][cid]["pairs"]) for cid in ids)


def trigger(base: int, new: int, cfg: AutopilotCfg) -> Trigger:
    """Whether ``new`` pairs on a corpus of ``base`` make a stage (see the module docstring)."""
    ratio = (base + new) / base if base > 0 else None
    if new < cfg.min_pairs:
        return Trigger(False, base, new, ratio, f"{new} new pairs < autopilot.min_pairs={cfg.min_pairs}")
    if ratio is None:
        return Trigger(True, base, new, ratio, f"{new} new pairs and an empty corpus")
    if ratio < cfg.min_growth:
        return Trigger(False, base, new, ratio, f"data ratio {ratio:.3f} < autopilot.min_growth={cfg.min_growth}")
    return Trigger(True, base, new, ratio, f"data ratio {ratio:.3f} >= autopilot.min_growth={cfg.min_growth}")


def retry_spent_crawls(state: dict[str, Any]) -> list[str]:
    """Forget the crawls rejected after too many failed ingests (a full disk, say), so that the next poll takes them
    again (``jobs autopilot --resume``); returns their ids."""
    spent = [cid for cid, c in state.get("crawls", {}).items() if c.get("retries_spent")]
    for cid in spent:
        del state["crawls"][cid]
        for f in state.get("folders", {}).values():
            if f.get("id") == cid:
                f.pop("done_sig", None)
                f["failures"] = 0
    return spent


def status_lines(ad: AutopilotDir, now: float | None = None) -> list[str]:
    """What ``jobs status`` shows of the autopilot (nothing when it never ran on this run dir)."""
    if not ad.state_json.exists():
        return []
    try:
        state = load_state(ad)
    except ValueError as exc:
        return [f"autopilot: {exc}"]
    now = time.time() if now is None else now
    last = state.get("last_poll")
    when = f"last poll {now - last:.0f} s ago" if last else "no poll yet"
    flight = state.get("in_flight")
    stages = state.get("stages", {})
    lines = [
        f"autopilot: {when}; "
        + (
            f"stage {flight} in flight (attempt {stages[str(flight)].get('attempts', 1)})"
            if flight
            else "no stage in flight"
        )
        + ("; stopped (--stop)" if ad.stop_flag.exists() else "")
    ]
    if state.get("paused"):
        lines.append(f"  PAUSED: {state['paused']}")
    ids, new = pending_pairs(state)
    crawls = state.get("crawls", {})
    waiting = [name for name, f in state.get("folders", {}).items() if not f.get("done_sig")]
    by = {s: sum(1 for c in crawls.values() if c.get("status") == s) for s in ("staged", "empty", "rejected")}
    lines.append(
        f"  crawls: {len(crawls)} ingested ({by['staged']} with pairs, {by['empty']} empty, {by['rejected']} "
        f"rejected), {len(ids)} pending with {new} pairs; {len(waiting)} not complete yet"
        + (f" ({', '.join(sorted(waiting)[:5])})" if waiting else "")
    )
    trig = state.get("trigger")
    if trig:
        ratio = "n/a (empty corpus)" if trig["ratio"] is None else f"{trig['ratio']:.3f}"
        lines.append(
            f"  trigger: corpus {trig['base']} pairs + {trig['new']} new -> ratio {ratio} vs min_growth "
            f"{trig['min_growth']} ({'reached' if trig['fire'] else 'not reached'}: {trig['why']})"
        )
    made = sorted(int(t) for t, s in stages.items() if not s.get("catch_up"))
    if made:
        lines.append(f"  stages made by the autopilot: {', '.join(map(str, made))}")
    return lines


def autopilot_stages(ad: AutopilotDir) -> set[int]:
    """The stages the autopilot made from crawls (``jobs report`` marks them)."""
    try:
        state = load_state(ad) if ad.state_json.exists() else None
    except ValueError:
        return set()
    if state is None:
        return set()
    return {
        int(t) for t, s in state.get("stages", {}).items() if not s.get("catch_up") and s.get("status") != "registering"
    }
