"""Loading base models: the demo, local folders, cached hub ids and GGUF files (converted once to
safetensors), offline. Where their files are is core/model_files.py's to say, torch-free.

Imports: core, and torch / transformers inside the functions that load.
"""
