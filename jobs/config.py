"""Run configuration: one YAML file per run, loaded once into frozen dataclasses.

Every job of a run (search candidates, select, train, evaluate) reads the same resolved config. The
file is strict: unknown keys are errors with a "did you mean" hint, values are type-checked, and
ranges are validated here, where the input enters (STYLE.md R2, R10). Functions downstream take the
narrowest section they need (``cfg.train``, ``cfg.model``), never the whole ``RunCfg``.

Sections:
    data     where the growing dataset lives and how batches mix old and new stages
    model    the stage-1 architecture (``model.ArchSpec``; later stages grow from it)
    growth   the data-aware growth space and PIM inheritance
    search   the short per-candidate trainings and how candidates are scored
    train    the full training of the selected architecture at each stage
    eval     zero-shot classification and retrieval evaluation
    cluster  how jobs are launched (SLURM via submitit, local, or in-process debug)
    autopilot  growth as crawls land: inbox, completeness, trigger, polling (``jobs autopilot``)

Usage::

    cfg = load_cfg(Path("configs/demo.yaml"), overrides=["train.lr=1e-4"])
    print(dump_cfg(cfg))
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from data_tools.tokenizer import MIN_CONTEXT_LENGTH
from model.search_space import GrowthSpace, grow_named
from model.spec import ArchSpec
from model.structs import ConfigError, apply_override, from_dict, to_dict

__all__ = [
    "AutopilotCfg",
    "ClusterCfg",
    "ConfigError",
    "DataCfg",
    "EvalCfg",
    "GrowthCfg",
    "RunCfg",
    "SearchCfg",
    "TrainCfg",
    "LAUNCH_KEYS",
    "check_stage",
    "config_differences",
    "dump_cfg",
    "with_absolute_paths",
    "load_cfg",
    "read_yaml",
]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _fraction(section: str, **values: float) -> None:
    for name, v in values.items():
        _require(0.0 <= v <= 1.0, f"{section}.{name}={v} must be in [0, 1]")


def _positive(section: str, **values: float) -> None:
    for name, v in values.items():
        _require(v > 0, f"{section}.{name}={v} must be > 0")


def _non_negative(section: str, **values: float) -> None:
    for name, v in values.items():
        _require(v >= 0, f"{section}.{name}={v} must be >= 0")


@dataclass(frozen=True)
class DataCfg:
    """Where the growing dataset lives and how a stage's batches are drawn."""

    root: Path = Path("data/offline")  # DATA_ROOT: manifest.json, shards/stage_NN/, tokenizer.json, eval/
    stages: int = 3  # growth stages in the plan; stage t trains on D_<=t (must exist in the manifest)
    replay_fraction: float = 0.5  # share of each batch drawn from earlier stages (0 = new data only)
    val_fraction: float = 0.05  # share of each new stage held out to score search candidates
    num_workers: int = 2  # data-loader worker processes per rank
    shuffle_buffer: int = 1000  # samples in the streaming shuffle buffer
    seed: int = 0  # seeds shard order, shuffling and the held-out split
    # the tokenizer a run trains with (copied into the run dir, its hash in every checkpoint: jobs/engine/tokens.py):
    # "corpus" = DATA_ROOT/tokenizer.json (byte-level BPE trained on stage 1's captions), "clip" = CLIP's standard BPE
    # (49,408 ids, from the open_clip wheel; model.text.vocab_size >= 49408), or the path of a tokenizer.json
    tokenizer: str = "corpus"
    # train a model whose model.image.image_size is larger than a stage's shard images (the loader upscales them);
    # off: plan/submit/train refuse it (jobs/engine/data.py check_corpus), on: they warn
    allow_upscale: bool = False

    def __post_init__(self) -> None:
        _require(
            self.tokenizer in ("corpus", "clip") or self.tokenizer.endswith(".json"),
            f"data.tokenizer={self.tokenizer!r}: use corpus, clip or the path of a tokenizer.json",
        )
        _positive("data", stages=self.stages, shuffle_buffer=self.shuffle_buffer)
        _non_negative("data", num_workers=self.num_workers)
        _fraction("data", replay_fraction=self.replay_fraction)
        _require(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in (0, 1)")


@dataclass(frozen=True)
class GrowthCfg(GrowthSpace):
    """The data-aware growth space (DESIGN.md step 1; fields of ``model.search_space.GrowthSpace``:
    axes, budget, alpha, depth_step, width_factor, heads_factor, mlp_factor, max_ops, max_candidates)
    and PIM inheritance."""

    momentum: float = 1.0  # PIM m: theta = m*inherited + (1-m)*fresh; 1 = exact inheritance, 0 = scratch
    inherit_from: Literal["model", "ema"] = "model"  # inherit the final weights or their EMA

    def __post_init__(self) -> None:
        super().__post_init__()
        _fraction("growth", momentum=self.momentum)


@dataclass(frozen=True)
class SearchCfg:
    """Per-candidate short trainings and scoring (DESIGN.md step 2; jobs/engine/search.py).

    Candidates are ranked by the search score (jobs/engine/score.py: held-out loss, caption-matching top-1
    weighted by ``zeroshot_weight``, log cost ratio weighted by ``cost_weight``; lower wins), measured on the
    first ``val_samples`` held-out pairs of the new stage in batches of ``batch_size``. Our design, not the
    paper's.
    """

    # how a candidate trains: "own" = a short training of its own (search.batch_size/lr/warmup_steps, schedule
    # over search.steps; the winner's training restarts from its grown weights); "train" = the first steps of the
    # stage's own training (train.* optimizer, batch and schedule over train.steps): the winner's training continues
    # from its last search checkpoint, so its search steps count toward train.steps (issue #17)
    trajectory: Literal["own", "train"] = "own"
    steps: int = 100  # optimizer steps each candidate trains in round 1 on the new stage (with replay)
    # successive halving: after each round the best ceil(keep x n) candidates train on; round r trains to
    # steps / keep^(r-1) steps in all (each round its own array, ranked in between by `select`). 1 = one round
    rounds: int = 1
    keep: float = 0.5  # fraction of a round's candidates that train in the next round (at least one)
    batch_size: int = 64  # global batch size of a candidate's training ("own"), and of its held-out scoring
    lr: float = 5.0e-4  # peak learning rate of a candidate's training ("own")
    warmup_steps: int = 10  # linear warmup steps of a candidate's training ("own")
    val_samples: int = 512  # held-out samples of the new stage used to score a candidate
    zeroshot_weight: float = 1.0  # weight of the zero-shot top-1 proxy in the score (0 = loss only)
    cost_weight: float = 0.1  # weight of the log cost ratio: growth must pay for itself
    min_successful: int = 1  # selection fails when fewer candidates finished than this
    # what the score's held-out loss is measured on: "loss" = the candidate's weights, "ema" = an exponential moving
    # average of them (AutoProg's momentum copies; decay ema_decay, or train.ema_decay when the training keeps one),
    # "refit" = the candidate's weights at the temperature that minimises the loss on the held-out batches (its
    # calibration factored out). Chosen by the oracle's learning curves (docs/fidelity.md, `jobs fidelity`)
    estimator: Literal["loss", "ema", "refit"] = "loss"
    ema_decay: float = 0.99

    def __post_init__(self) -> None:
        _positive("search", steps=self.steps, batch_size=self.batch_size, lr=self.lr)
        _positive("search", val_samples=self.val_samples, min_successful=self.min_successful)
        _non_negative("search", warmup_steps=self.warmup_steps)
        _non_negative("search", zeroshot_weight=self.zeroshot_weight, cost_weight=self.cost_weight)
        _require(
            self.warmup_steps <= self.steps, f"search.warmup_steps={self.warmup_steps} > search.steps={self.steps}"
        )
        _positive("search", rounds=self.rounds)
        _require(0.0 < self.ema_decay < 1.0, f"search.ema_decay={self.ema_decay} must be in (0, 1)")
        _require(0.0 < self.keep < 1.0, f"search.keep={self.keep} must be in (0, 1): the fraction kept per round")
        _require(
            self.rounds == 1 or self.trajectory == "train",
            f"search.rounds={self.rounds} needs search.trajectory=train (a short training of its own has a schedule "
            "per length: its rounds could not resume one another); set search.trajectory=train or search.rounds=1",
        )

    def round_steps(self, r: int) -> int:
        """The optimizer steps a candidate has trained in all at the end of round ``r`` (1-based)."""
        return max(1, round(self.steps / self.keep ** (r - 1)))

    def survivors(self, n: int) -> int:
        """How many of a round's ``n`` candidates train in the next round."""
        return max(1, math.ceil(n * self.keep - 1e-9))


@dataclass(frozen=True)
class TrainCfg:
    """Full training of the selected architecture on D_<=t (DESIGN.md step 3)."""

    steps: int = 1000  # optimizer steps per stage
    batch_size: int = 128  # global batch size (summed over ranks and accumulation steps)
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    optimizer: Literal["adamw", "lamb"] = "adamw"  # fused apex kernel when installed, else torch/timm
    lr: float = 5.0e-4  # peak learning rate
    min_lr: float = 0.0  # floor of the cosine schedule
    warmup_steps: int = 100  # linear warmup steps before the cosine decay
    weight_decay: float = 0.2  # decoupled weight decay (never on norms, biases, embeddings, logit scale)
    betas: tuple[float, ...] = (0.9, 0.98)  # Adam/LAMB betas
    eps: float = 1.0e-6  # Adam/LAMB epsilon
    grad_clip: float = 1.0  # max global grad norm (0 = no clipping)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory
    # torch.compile the forward: auto = on CUDA only (1.3x on the H100 ViT-B/16 bf16 step; 0.97x on CPU after
    # ~40 s of compiling, benchmarks/README.md); on = any device (CPU needs a C compiler); off = eager.
    # YAML reads a bare on/off as true/false: those are accepted and stored as "on"/"off".
    compile: Literal["auto", "on", "off"] | bool = "auto"
    # under bf16 autocast keep the residual stream between blocks in bf16, not float32 (1.08x on the H100
    # ViT-B/16 step, 10 % less peak memory; LayerNorm statistics stay float32); no effect in fp32
    bf16_residual: bool = True
    ema_decay: float = 0.0  # EMA of the weights (0 = off); PIM can inherit from it
    checkpoint_every: int = 100  # steps between checkpoints (a final.pt is always written)
    keep_checkpoints: int = 3  # newest step checkpoints kept on disk
    log_every: int = 10  # steps between log lines and metric records
    # steps between held-out validations (0 = off; a multiple of log_every): the step's metric record gains
    # val_loss, val_loss_se (and val_loss_ema with an EMA) on the stage's eval.heldout_samples held-out pairs. Learning
    # curves for the oracle and the search's extrapolation (issue #17); the trajectory itself is unchanged
    val_every: int = 0
    seed: int = 0  # seeds init, data order and dropout
    data_streams: int = 0  # sub-streams forming the global batch (0 = one per rank); fix it: same data at any #ranks

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):
            object.__setattr__(self, "compile", "on" if self.compile else "off")
        _require(self.compile in ("auto", "on", "off"), f"train.compile={self.compile!r}: expected auto, on or off")
        _positive("train", steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr)
        _non_negative("train", data_streams=self.data_streams)
        _require(
            self.data_streams == 0 or self.batch_size % (self.grad_accum * self.data_streams) == 0,
            f"train.batch_size={self.batch_size} must be divisible by train.grad_accum={self.grad_accum} x "
            f"train.data_streams={self.data_streams}",
        )
        _positive("train", eps=self.eps, checkpoint_every=self.checkpoint_every, log_every=self.log_every)
        _non_negative("train", val_every=self.val_every)
        _require(
            self.val_every % self.log_every == 0,
            f"train.val_every={self.val_every} must be a multiple of train.log_every={self.log_every} (a validation "
            "rides on a metric record)",
        )
        _positive("train", keep_checkpoints=self.keep_checkpoints)
        _non_negative("train", min_lr=self.min_lr, warmup_steps=self.warmup_steps)
        _non_negative("train", weight_decay=self.weight_decay, grad_clip=self.grad_clip)
        _require(math.isfinite(self.lr), f"train.lr={self.lr} must be a finite number")
        _require(self.min_lr <= self.lr, f"train.min_lr={self.min_lr} must be <= train.lr={self.lr}")
        _require(self.warmup_steps <= self.steps, f"train.warmup_steps={self.warmup_steps} > train.steps={self.steps}")
        _require(
            self.batch_size % self.grad_accum == 0,
            f"train.batch_size={self.batch_size} must be divisible by train.grad_accum={self.grad_accum}",
        )
        _require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"train.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.98]",
        )
        _require(0.0 <= self.ema_decay < 1.0, f"train.ema_decay={self.ema_decay} must be in [0, 1) (0 = off)")


@dataclass(frozen=True)
class EvalCfg:
    """Zero-shot classification and image-text retrieval after each stage."""

    tasks: tuple[str, ...] = ()  # eval task names under DATA_ROOT/eval/ (empty = every task found)
    # more tasks, always evaluated: CLIP_benchmark webdataset folders as published (test/nshards.txt, test/0.tar ...)
    task_dirs: tuple[Path, ...] = ()
    workers: int = 0  # data-loader processes decoding eval images (0 = in the evaluating process)
    batch_size: int = 256  # images or captions per forward pass
    retrieval_ks: tuple[int, ...] = (1, 5, 10)  # R@k reported for image->text and text->image
    heldout_samples: int = 10000  # held-out pairs of the stage scored after its training (loss + its std error)

    def __post_init__(self) -> None:
        _positive("eval", batch_size=self.batch_size, heldout_samples=self.heldout_samples)
        _non_negative("eval", workers=self.workers)
        _require(len(self.retrieval_ks) > 0, "eval.retrieval_ks must list at least one k, e.g. [1, 5, 10]")
        _require(all(k > 0 for k in self.retrieval_ks), f"eval.retrieval_ks={list(self.retrieval_ks)} must be > 0")


# where jobs run: one name per jobs.cluster.CLUSTERS entry (the --executor choices read EXECUTORS)
Executor = Literal["slurm", "local", "debug"]
EXECUTORS: tuple[str, ...] = typing.get_args(Executor)


@dataclass(frozen=True)
class ClusterCfg:
    """How jobs are launched. SLURM specifics stay here and in slurm/ (STYLE.md R15)."""

    executor: Executor = "slurm"  # debug: in-process, same code path
    partition: str = ""  # SLURM partition ("" = the cluster's default)
    account: str = ""  # SLURM account ("" = the user's default)
    qos: str = ""  # SLURM QOS ("" = none)
    nodes: int = 1  # nodes per training job
    gpus_per_node: int = 0  # GPUs per node (also tasks per node when > 0: one rank per GPU)
    cpus_per_task: int = 2  # CPU cores per task (data-loader workers + main process)
    mem_gb: float = 8.0  # memory per node in GiB
    search_time_min: int = 60  # time limit of one search-candidate task
    train_time_min: int = 240  # time limit of one training job (it requeues itself on timeout)
    eval_time_min: int = 60  # time limit of one evaluation job
    array_parallelism: int = 8  # search-array tasks running at once
    signal_delay_s: int = 90  # USR2 is sent this long before the time limit, to checkpoint and requeue
    max_requeues: int = 10  # preemptions/timeouts a job may survive before it fails
    setup: tuple[str, ...] = ()  # shell lines run before each job (e.g. "module load cuda/12.4")
    extra_sbatch: dict[str, str] = field(default_factory=dict)  # further #SBATCH options, e.g. {constraint: a100}

    def __post_init__(self) -> None:
        _positive("cluster", nodes=self.nodes, cpus_per_task=self.cpus_per_task, mem_gb=self.mem_gb)
        _positive("cluster", search_time_min=self.search_time_min, train_time_min=self.train_time_min)
        _positive("cluster", eval_time_min=self.eval_time_min, array_parallelism=self.array_parallelism)
        _non_negative("cluster", gpus_per_node=self.gpus_per_node, signal_delay_s=self.signal_delay_s)
        _non_negative("cluster", max_requeues=self.max_requeues)
        _require(
            self.signal_delay_s < 60 * min(self.search_time_min, self.train_time_min, self.eval_time_min),
            f"cluster.signal_delay_s={self.signal_delay_s} must be shorter than every job time limit",
        )


@dataclass(frozen=True)
class AutopilotCfg:
    """Growth on autopilot (``python -m jobs autopilot``; jobs/engine/autopilot.py): each crawl that lands in ``inbox``
    is ingested once; when the new pairs make the corpus ``min_growth`` times larger than at the last stage, they become
    the next stage and its search -> select -> train -> evaluate chain is submitted. Our design (issue #20)."""

    inbox: Path = Path("")  # where crawls land, one folder each (img2dataset output, tables + images); required
    marker: str = "_SUCCESS"  # a crawl is complete when this file is in its folder (img2dataset writes none: add it)
    quiet_s: float = 0.0  # also complete when nothing in its folder changed for this many seconds (0 = marker only)
    # `python -m data_tools ingest` options for every crawl (not --input/--format/--data-root/--stage), e.g.
    # ["--image-size", "64", "--caption-col", "title"]; staged crawls join a stage with --no-reencode
    ingest_args: tuple[str, ...] = ()
    min_growth: float = 1.5  # trigger: (pairs in the corpus + new pairs) / pairs in the corpus >= this
    min_pairs: int = 1  # and at least this many new pairs (what the first stage needs)
    max_stages: int = 0  # make no stage beyond this one (0 = no limit)
    poll_s: float = 300.0  # seconds between polls (the recurring SLURM job starts again this long after one ends)
    retries: int = 2  # resubmissions of a failed stage; then growth pauses until `jobs autopilot --resume`
    time_min: int = 60  # SLURM time limit of one poll (ingests included); a poll stops taking crawls at half of it

    def __post_init__(self) -> None:
        _require(
            bool(self.marker) and "/" not in self.marker,
            f"autopilot.marker={self.marker!r} must be a file name (e.g. _SUCCESS)",
        )
        _non_negative("autopilot", quiet_s=self.quiet_s, max_stages=self.max_stages, retries=self.retries)
        _positive("autopilot", min_pairs=self.min_pairs, poll_s=self.poll_s, time_min=self.time_min)
        _require(self.min_growth >= 1.0, f"autopilot.min_growth={self.min_growth} must be >= 1 (1 = any new pairs)")
        reserved = {"--input", "--format", "--data-root", "--stage", "--no-reencode"} & {
            a.split("=", 1)[0] for a in self.ingest_args
        }
        _require(
            not reserved,
            f"autopilot.ingest_args sets {sorted(reserved)}: the autopilot sets those itself; remove them",
        )


@dataclass(frozen=True)
class RunCfg:
    """One growth run: every job of the run reads this (resolved) config."""

    name: str = "growclip"  # run name; RUN_ROOT/<name>/ holds everything the run writes
    run_root: Path = Path("runs")  # RUN_ROOT on the shared filesystem (e.g. Lustre)
    data: DataCfg = field(default_factory=DataCfg)  # growing dataset
    model: ArchSpec = field(default_factory=ArchSpec)  # stage-1 architecture; later stages grow from it
    growth: GrowthCfg = field(default_factory=GrowthCfg)  # data-aware growth space and PIM
    search: SearchCfg = field(default_factory=SearchCfg)  # per-candidate trainings and scoring
    train: TrainCfg = field(default_factory=TrainCfg)  # full training per stage
    eval: EvalCfg = field(default_factory=EvalCfg)  # evaluation per stage
    cluster: ClusterCfg = field(default_factory=ClusterCfg)  # launching
    autopilot: AutopilotCfg = field(default_factory=AutopilotCfg)  # growth as crawls land (`jobs autopilot`)

    def __post_init__(self) -> None:
        _require(
            bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name),
            f"name={self.name!r} must be non-empty and use only letters, digits, '-', '_', '.'",
        )
        n = len(self.growth.schedule)
        _require(
            n == 0 or n >= self.data.stages - 1,
            f"growth.schedule has {n} entries but data.stages={self.data.stages} needs {self.data.stages - 1} "
            f"(one per stage after the first)",
        )
        ctx = self.model.text.context_length
        _require(
            ctx >= MIN_CONTEXT_LENGTH,
            f"model.text.context_length={ctx} leaves no room for the tokenizer's start and end tokens; "
            f"set it to at least {MIN_CONTEXT_LENGTH} (CLIP uses 77)",
        )
        last = self.search.round_steps(self.search.rounds)
        _require(
            self.search.trajectory == "own" or last < self.train.steps,
            f"search.trajectory=train: the last search round ends at step {last} (search.steps / search.keep^"
            f"(rounds-1)), which must be below train.steps={self.train.steps}; lower search.steps or search.rounds",
        )
        spec = self.model
        for i, entry in enumerate(self.growth.schedule):  # every scheduled growth must give a valid spec
            try:
                spec = grow_named(spec, entry, self.growth)
            except ValueError as exc:
                raise ValueError(f"growth.schedule[{i}]={entry!r} (stage {i + 2}): {exc}") from exc

    @property
    def run_dir(self) -> Path:
        """RUN_ROOT/<name>: where this run's plan, stages and logs live."""
        return self.run_root / self.name


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the
    last value silently: a config with ``train:`` twice would lose the first section)."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: construct_mapping merges it
            continue
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise ConfigError(f"line {line}: a key must be a name, got a {type(key).__name__}") from None
        if key in seen:
            raise ConfigError(
                f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one: YAML would silently drop "
                "the first"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``, strictly: UTF-8, no key twice, one-line ``ConfigError`` otherwise."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass the path of a YAML file such as configs/demo.yaml")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror}); check its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}, offset {exc.start}); "
            "save the file as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, most control characters)
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(
            f"{path}: not valid YAML: character {chr(exc.character)!r} at line {line} is not allowed; remove it"
        ) from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def with_absolute_paths(cfg: RunCfg) -> RunCfg:
    """The config with every path absolute (data.root, a data.tokenizer file, eval.task_dirs, a set autopilot.inbox):
    a queued job may start in another directory than the one it was submitted from (``submit``, ``submit-train``,
    ``autopilot``)."""
    tok = cfg.data.tokenizer
    tok = tok if tok in ("corpus", "clip") else str(Path(tok).resolve())
    data = replace(cfg.data, root=cfg.data.root.resolve(), tokenizer=tok)
    inbox = cfg.autopilot.inbox if cfg.autopilot.inbox == Path("") else cfg.autopilot.inbox.resolve()
    return replace(
        cfg,
        data=data,
        eval=replace(cfg.eval, task_dirs=tuple(p.resolve() for p in cfg.eval.task_dirs)),
        autopilot=replace(cfg.autopilot, inbox=inbox),
    )


def load_cfg(path: Path | None, overrides: Sequence[str] = ()) -> RunCfg:
    """Load a run config from YAML, apply ``section.key=value`` overrides, validate everything.

    Args:
        path: the YAML file; ``None`` starts from the defaults.
        overrides: ``--set`` strings applied in order, e.g. ``("train.lr=1e-4", "model.image.depth=4")``.

    Returns:
        The frozen, validated :class:`RunCfg`.

    Raises:
        ConfigError: missing/unparsable file, unknown key (with the closest valid key), wrong type,
            out-of-range value, or a malformed override.
    """
    raw = read_yaml(path) if path is not None else {}
    for text in overrides:
        apply_override(raw, RunCfg, text)
    return from_dict(RunCfg, raw)


def dump_cfg(cfg: RunCfg) -> str:
    """The resolved config as YAML; ``load_cfg`` of this text gives back an equal ``RunCfg``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, width=100)


# Keys (or whole sections) that say how and where a run is launched, or how a training is carried out
# without changing what it computes: a run dir accepts a re-run that changes them. Launch: more time,
# another partition or executor, the run named differently. Recovery, as the failure messages advise:
# fewer checkpoints kept after a full disk; gradient accumulation or checkpointing after an out-of-memory
# stop (the data streams stay the same; the trainer warns when the micro-batch layout changes); compile,
# loader workers and log frequency.
LAUNCH_KEYS = (
    "name",
    "run_root",
    "cluster",
    "autopilot",  # when crawls become stages, not what a stage computes
    "data.stages",  # the plan's length: a stage's work never depends on how many follow (the autopilot raises it)
    "data.num_workers",
    "train.keep_checkpoints",
    "train.log_every",
    "train.val_every",
    "train.grad_accum",
    "train.grad_checkpointing",
    "train.compile",
)


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_differences(old: RunCfg, new: RunCfg, *, ignore: Sequence[str] = LAUNCH_KEYS) -> list[str]:
    """What makes ``new`` another config than ``old``: ``["train.steps: 40 -> 80", ...]`` (empty: the same).

    Launch settings (``ignore``) do not count, nor does the spelling of ``data.root`` (compared resolved), nor
    a key added to the schema since ``old`` was written (it loads at its default, so it equals ``new``'s).
    """

    def flat(cfg: RunCfg) -> dict[str, Any]:
        d = to_dict(cfg)
        d["data"]["root"] = str(Path(d["data"]["root"]).resolve())
        return {k: v for k, v in _flat(d).items() if not any(k == i or k.startswith(f"{i}.") for i in ignore)}

    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def check_stage(cfg: RunCfg, stage: int, *, first: int = 1) -> None:
    """``--stage`` names a stage of the plan (``first`` = 2 for the growth steps: stage 1 has no search).

    Raises:
        ConfigError: the stage is outside ``first..data.stages``.
    """
    if not first <= stage <= cfg.data.stages:
        why = " (stage 1 has no search: it trains the config's model)" if first == 2 and stage == 1 else ""
        raise ConfigError(f"--stage {stage} must be in {first}..data.stages={cfg.data.stages}{why}")
