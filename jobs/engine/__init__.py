"""Training and evaluation engine: plain modules that never import submitit (STYLE.md R1, R13).

``dist`` (rank/world size from the environment, in one place), ``checkpoint`` (atomic, checksummed
checkpoints and resume), ``data`` (the resumable, world-size-independent batch stream), ``metrics``
(events.jsonl + metrics.h5), training in three layers — ``trainer`` (wiring), ``train_state`` (the
one checkpoint payload), ``loop`` (the steps) — and ``evaluate`` (zero-shot classification and
retrieval). ``jobs/train.py``, ``jobs/evaluate.py`` and ``jobs/submit_train.py`` are the thin entry
points on top; ``jobs/cluster.py`` is the one place that knows executors and queues.
"""
