"""The fine-tuning recipe (recipe.py), its checkpoints and the checks before a run (preflight.py).

Imports: core, models, and cuda (the recipe picks the CUDA path on a GPU).
"""
