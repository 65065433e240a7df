"""Finding and loading base models: the demo, local folders, cached hub ids and GGUF files, offline.

Imports: core, and torch / transformers inside the functions that load.
"""
