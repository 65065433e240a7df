"""The fine-tuning recipe (recipe.py: setup, train loop, cleanup), its checkpoints, and the checks
before a run (preflight.py). The recipe's parts: the LoRA adapter it attaches (adapter.py), its
step plan and learning-rate schedule (schedule.py), a run's record and resuming from it
(resume.py), data parallel over several processes (distributed.py), trackers (trackers.py).

types.py holds what the recipe and the CUDA path share (the run's files, a batch, the train
path) and plain.py the path that runs everywhere, so cuda/ builds on both without importing the
recipe.

Imports: core, models, and cuda (the recipe picks the CUDA path on a GPU); torch, transformers
and peft inside the functions that train.
"""
