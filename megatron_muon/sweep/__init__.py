"""Telescoping hyperparameter sweeps (arXiv 2505.02222, Algorithm 1) as a resumable command; see __main__.py.

store.py keeps the results (SQLite), backends.py runs trials (local processes or SLURM arrays), runner.py drives
them stage by stage, report.py turns a store into plots, trial.py is the default tiny-GPT trial.
"""
