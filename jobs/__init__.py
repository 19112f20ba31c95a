"""GrowCLIP jobs: the CLI (``python -m jobs``), job entry points and orchestration.

Only this package (and slurm/) knows about SLURM and submitit (STYLE.md R1, R15).
"""
