"""Generation and export: side-by-side decoding of base and adapters, prompts, merged models.

Imports: core and models; torch, transformers and peft inside the functions that run a model.
"""
