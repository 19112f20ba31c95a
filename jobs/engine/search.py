"""One search candidate of a growth stage: grow with PIM, train briefly, score (DESIGN.md step 2).

``run_search_candidate(cfg, stage, index, run_dir, env)`` is what one SLURM array task runs:

1. the stage's growth space (``model.search_space.enumerate_candidates`` from A_{t-1} = the ArchSpec
   of stage t-1's ``final.pt`` and the data ratio |D_<=t| / |D_<=t-1| of the manifest) is
   recomputed — it is deterministic, so every task and ``select`` agree — and candidate ``index``
   picked (an index beyond the list means "nothing to do": arrays submitted before A_{t-1} was known
   use an upper bound);
2. ``model.grow`` expands stage t-1's final weights (or their EMA, ``growth.inherit_from``) to the
   candidate with PIM momentum ``growth.momentum``; the grown checkpoint is ``cand_KK/grown.pt``;
3. the trainer (``jobs.engine.trainer.run_training``) trains it in ``cand_KK/work/``: with
   ``search.trajectory=train`` the first ``search.round_steps(round)`` steps of the stage's own training
   (its optimizer, batch, data order and schedule; a later round resumes the previous round's checkpoint,
   issue #17), with ``own`` ``search.steps`` steps of a short training of its own on D_<=t with replay
   (``search.batch_size/lr/warmup_steps``) — resumable like any training:
   with ``should_stop`` (SIGUSR2 in the array task) it checkpoints at the next step boundary and the
   call returns ``{"status": "preempted"}`` (no ``failed.json``); the requeued task resumes there
   (skipped when the stage has a single candidate — a fixed ``growth.schedule`` or ``axes: []`` —
   since there is nothing to choose: the grown weights are scored as they are);
4. it is scored on the held-out split of stage t (``data.val_fraction``; first ``search.val_samples``
   pairs, in batches of ``search.batch_size``, identical for every candidate; the weights or, with
   ``search.estimator=ema``, their EMA; with ``refit``, the loss at the temperature re-fitted on these
   batches) with the search score
   (``jobs.engine.score.SearchScore``: held-out loss, caption-matching top-1 and cost; lower wins; the eval
   suite is never used for selection);
5. ``cand_KK/result.json`` is written atomically (the latest round's; earlier rounds in ``history``); one of
   this round or later means the task is done (skipped).
   A failure writes ``cand_KK/failed.json`` (reason) and re-raises, so the task fails and a
   resubmission reruns it alone.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from data_tools.atomic import atomic_write_json
from jobs.config import RunCfg
from jobs.engine.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from jobs.engine.dist import DistEnv
from jobs.engine.evaluate import val_batches, validate_model
from jobs.engine.metrics import MetricsLog, MetricsWriteError
from jobs.engine.pipeline import data_ratio, previous_spec, stage_candidates
from jobs.engine.records import CandidateResult, RoundRanking, read_record
from jobs.engine.rundir import RunDir, read_json
from jobs.engine.score import SearchScore
from jobs.engine.tokens import checkpoint_tokenizer
from jobs.engine.train_state import TrainState
from jobs.engine.trainer import run_training
from model.search_space import Candidate
from model.structs import to_dict

__all__ = [
    "RESULT_FORMAT",
    "search_cfg",
    "prefix_cfg",
    "grow_checkpoint",
    "run_search_candidate",
]

logger = logging.getLogger(__name__)

RESULT_FORMAT = "growclip-search-result"


def search_cfg(cfg: RunCfg) -> RunCfg:
    """The run config of a candidate's short training: ``train`` takes the ``search`` hyper-parameters."""
    s, t = cfg.search, cfg.train
    train = replace(
        t,
        steps=s.steps,
        batch_size=s.batch_size,
        grad_accum=1,
        data_streams=0,
        lr=s.lr,
        min_lr=min(t.min_lr, s.lr),
        warmup_steps=s.warmup_steps,
        checkpoint_every=s.steps,  # one final checkpoint (+ one on preemption, where a requeued task resumes)
        keep_checkpoints=1,
        log_every=max(1, min(t.log_every, s.steps)),
        ema_decay=cfg.search.ema_decay if cfg.search.estimator == "ema" else 0.0,
    )
    return replace(cfg, train=train)


def prefix_cfg(cfg: RunCfg) -> RunCfg:
    """The run config of a candidate's rounds under ``search.trajectory=train``: the stage's own training (same
    optimizer, batch, data order and schedule over ``train.steps``), keeping only its newest checkpoint, and an EMA
    of the weights when ``search.estimator`` is "ema"."""
    ema = cfg.train.ema_decay or (cfg.search.ema_decay if cfg.search.estimator == "ema" else 0.0)
    # an EMA kept only for the estimator never changes the weights; the winner's training ignores it
    return replace(cfg, train=replace(cfg.train, keep_checkpoints=1, ema_decay=ema))


def _round_brief(res: CandidateResult) -> dict[str, Any]:
    """What ``history`` keeps of an earlier round's result."""
    keys = ("round", "steps", "samples", "train_flops", "val_loss", "val_loss_se", "proxy_acc1", *SearchScore.keys())
    return {k: getattr(res, k) for k in keys}


def grow_checkpoint(cfg: RunCfg, run_dir: Path, stage: int, cand: Candidate, out: Path) -> dict[str, Any]:
    """Grow stage t-1's final model to ``cand.spec`` with PIM and save it as a checkpoint ``out``.

    Returns the growth record (``GrowthRecord.to_dict()``). The checkpoint is a valid ``--init``:
    its ``growth_history`` is stage t-1's plus this record.
    """
    from model.clip import build_model
    from model.pim import grow

    prev_final = RunDir(run_dir).stage(stage - 1).final
    payload = load_checkpoint(prev_final)
    prev = previous_spec(run_dir, stage)
    model = build_model(prev, seed=cfg.train.seed)
    model.load_state_dict(payload["model"], strict=True)
    source = None
    if cfg.growth.inherit_from == "ema":
        if payload.get("ema") is None:
            logger.warning(
                "growth.inherit_from=ema but %s has no EMA (train.ema_decay=0): inheriting the model", prev_final
            )
        else:
            source = {k: v.to(next(model.parameters()).dtype) for k, v in payload["ema"].items()}
    grown, record = grow(model, cand.spec, cfg.growth.momentum, seed=cfg.train.seed + stage, source=source)
    rec = record.to_dict()
    rec.update(stage=stage, candidate=cand.name)
    history = [*payload.get("growth_history", []), rec]
    state = TrainState(  # model only: step 0; the tokenizer stays the one the inherited weights learnt
        stage, cand.spec, grown, to_dict(cfg), history, init=str(prev_final), tokenizer=payload.get("tokenizer_sha256")
    )
    save_checkpoint(state.state_dict(), out)
    return rec


def run_search_candidate(
    cfg: RunCfg,
    stage: int,
    index: int,
    run_dir: Path,
    env: DistEnv,
    should_stop: Callable[[], bool] = lambda: False,
    before_scoring: Callable[[], None] = lambda: None,
    round: int = 1,
) -> dict[str, Any]:
    """Grow, train and score candidate ``index`` of stage ``stage``; write and return its result.

    Args:
        index: the array task: candidate ``index`` in round 1, the ``index``-th survivor of round
            ``round - 1`` (``search/round_RR.json``) in a later round.
        round: the search round (successive halving, ``search.rounds``): the candidate trains on to
            ``search.round_steps(round)`` steps, resuming its previous round's checkpoint.
        should_stop: polled at step boundaries of the candidate's training (preemption): when it turns
            True the training checkpoints and the call returns ``{"status": "preempted", "step": N}``.

    Returns:
        result.json's content; ``{"status": "absent"}`` when the stage has fewer candidates;
        ``{"status": "preempted", ...}`` when ``should_stop`` stopped the training (call again to resume).

    ``before_scoring`` is called once the training is over (or skipped), before ``should_stop`` is polled a
    last time and the scoring starts: the array task's entry points switch SIGUSR2 to "requeue at once"
    there, since nothing is left to checkpoint (``final.pt`` is on disk) and scoring may outlast the
    warning's grace time.

    Raises:
        RuntimeError: stage t-1 is not trained yet, or the candidate's training did not complete.
        Any error of growth/training/scoring (after ``failed.json`` is written).
    """
    from model.clip import build_model

    if stage < 2:
        raise ValueError(f"stage {stage} has no growth search: stage 1 trains the config's model")
    run_dir = Path(run_dir)
    found = stage_candidates(cfg, run_dir, stage)
    if found is None:
        raise RuntimeError(f"stage {stage - 1} is not trained yet ({RunDir(run_dir).stage(stage - 1).final})")
    kept, pruned = found
    cands_json = RunDir(run_dir).stage(stage).candidates_json
    if env.is_main and not cands_json.exists():
        atomic_write_json(
            cands_json,
            {
                "stage": stage,
                "data_ratio": data_ratio(cfg.data.root, stage),
                "budget": cfg.growth.budget,
                "candidates": [c.to_dict() for c in kept],
                "pruned": [p.to_dict() for p in pruned],
            },
        )
    members = list(range(len(kept)))
    if round > 1:
        ranking = read_record(RoundRanking, RunDir(run_dir).stage(stage).round_json(round - 1))
        if ranking is None:
            raise RuntimeError(f"stage {stage} search round {round - 1} is not ranked yet (select --round {round - 1})")
        members = list(ranking.survivors)
    if index >= len(members):
        logger.info("stage %d round %d has %d candidates: array task %d has nothing to do", stage, round,
                    len(members), index)  # fmt: skip
        return {"status": "absent", "index": index}
    task, index = index, members[index]
    cand = kept[index]
    cd = RunDir(run_dir).stage(stage).cand(index)
    done = read_record(CandidateResult, cd.result_json)
    if done is not None and done.round >= round:
        logger.info("stage %d candidate %d (%s) already scored in round %d: %s", stage, index, cand.name, done.round,
                    done.score)  # fmt: skip
        return read_json(cd.result_json) or {}
    if round > 1 and done is None:
        raise RuntimeError(f"stage {stage} candidate {index} survived round {round - 1} but has no result of it")
    if task != index:
        logger.info("stage %d round %d: array task %d is candidate %d (%s)", stage, round, task, index, cand.name)
    cd.path.mkdir(parents=True, exist_ok=True)
    events = MetricsLog(cd.path, enabled=env.is_main)
    t0 = time.time()
    try:
        atomic_write_json(cd.spec_json, {"name": cand.name, "spec": cand.spec.to_dict()})
        events.event(
            "start", stage=stage, index=index, name=cand.name, cost=cand.cost, cost_ratio=cand.cost_ratio, round=round
        )
        grown = cd.grown
        record = read_json(cd.growth_json)
        if record is None or not grown.exists():
            record = grow_checkpoint(cfg, run_dir, stage, cand, grown)
            atomic_write_json(cd.growth_json, record)
        events.event(
            "grown", params_before=record["params_before"], params_after=record["params_after"], error=record["error"]
        )

        def preempted(step: int, saved: Path | None) -> dict[str, Any]:
            events.event("preempted", step=step, checkpoint=str(saved))
            logger.info(
                "stage=%d candidate %d %s: preempted at step %d (%s on disk); the requeued task resumes there",
                stage, index, cand.name, step, saved,
            )  # fmt: skip
            return {"status": "preempted", "stage": stage, "index": index, "name": cand.name, "step": step}

        checkpoint: Path | None = None
        if len(kept) == 1:
            # nothing to choose (a fixed schedule, or a space holding only "none"): no search training;
            # the grown weights are scored as they are, which records the loss just after growth
            before_scoring()
            if should_stop():  # scoring reads the held-out split: too long for the warning's grace time
                return preempted(0, grown)
            logger.info("stage %d has a single candidate (%s): scored without search training", stage, cand.name)
            scored, steps = grown, 0
        elif cfg.search.trajectory == "train":  # the first steps of the stage's own training (issue #17)
            target = cfg.search.round_steps(round)
            result = run_training(
                prefix_cfg(cfg), stage, cd.work, env, init=grown, should_stop=should_stop, stop_at=target
            )
            if result.status == "preempted":
                return preempted(result.step, result.last_checkpoint)
            before_scoring()
            if should_stop():  # the signal came after the round's last step: the requeued task scores
                return preempted(result.step, result.last_checkpoint)
            if result.status != "stopped" or result.last_checkpoint is None:
                raise RuntimeError(f"candidate training ended at step {result.step} ({result.status}), not {target}")
            checkpoint = result.last_checkpoint
            scored, steps = checkpoint, result.step
        else:
            result = run_training(search_cfg(cfg), stage, cd.work, env, init=grown, should_stop=should_stop)
            if result.status == "preempted":
                return preempted(result.step, result.last_checkpoint)
            before_scoring()
            if should_stop():  # the signal came after the last step: the requeued task finds final.pt and scores
                return preempted(result.step, result.final)
            if result.final is None:
                raise RuntimeError(f"candidate training stopped at step {result.step} ({result.status})")
            scored, steps = result.final, result.step
            for gone in prune_checkpoints(result.train_dir / "checkpoints", 0):  # redundant next to final.pt
                logger.info("removed %s (the candidate's final.pt is written and verifies)", gone)
        payload = load_checkpoint(scored)
        tokenizer = checkpoint_tokenizer(scored, payload, None, cfg.data.root)  # the one its weights learnt
        model = build_model(cand.spec, seed=cfg.train.seed)
        use_ema = cfg.search.estimator == "ema" and payload.get("ema") is not None  # none before any training
        weights = payload["ema"] if use_ema else payload["model"]
        model.load_state_dict({k: v.to(payload["model"][k].dtype) for k, v in weights.items()}, strict=True)
        model.to(env.device)
        val = validate_model(
            model,
            val_batches(cfg, stage, cand.spec.image.image_size, cand.spec.text.context_length, tokenizer=tokenizer),
            env.device,
        )
        samples = int(payload["samples_seen"])
        refit = cfg.search.estimator == "refit"
        loss_key = "val_loss_refit" if refit else "val_loss"
        res = {
            "format": RESULT_FORMAT,
            "status": "done",
            "stage": stage,
            "index": index,
            "name": cand.name,
            "spec": cand.spec.to_dict(),
            "cost": cand.cost,
            "cost_ratio": cand.cost_ratio,
            "params": cand.spec.params(),
            "flops_per_sample": cand.spec.flops_per_sample(),
            "steps": steps,
            "samples": samples,
            "train_flops": cand.spec.flops_per_sample() * samples,
            **val,
            "estimator": "ema" if use_ema else "refit" if refit else "loss",
            **SearchScore.of(cfg.search)(val[loss_key], val["proxy_acc1"], cand.cost_ratio),
            "growth": record,
            "grown": str(grown),
            "seconds": time.time() - t0 + ((done.seconds or 0.0) if done is not None else 0.0),  # all rounds
            "round": round,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "history": [*done.history, _round_brief(done)] if done is not None else [],
        }
    except Exception as exc:
        if env.is_main:
            try:  # best effort: on a full disk these fail too, and the original error is the one to report
                atomic_write_json(
                    cd.failed_json,
                    {
                        "stage": stage,
                        "index": index,
                        "name": cand.name,
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                        "time": time.time(),
                    },
                )
                events.event("failed", error=f"{type(exc).__name__}: {exc}")
            except (OSError, MetricsWriteError) as again:
                logger.warning("stage %d candidate %d: failure not recorded on disk (%s)", stage, index, again)
        raise
    if env.is_main:
        atomic_write_json(cd.result_json, res)
        cd.failed_json.unlink(missing_ok=True)  # an earlier attempt's failure is history now
        events.event("scored", **{k: res[k] for k in ("val_loss", "proxy_acc1", "score", "train_flops")})
    logger.info(
        "stage=%d candidate %d %s: params %.3fM val_loss %.4f proxy_acc1 %.3f score %.4f (%.0f s)",
        stage,
        index,
        cand.name,
        res["params"] / 1e6,
        res["val_loss"],
        res["proxy_acc1"],
        res["score"],
        res["seconds"],
    )
    return res
