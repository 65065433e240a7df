"""Loading base models: the demo, local folders, cached hub ids and GGUF files (converted once to
safetensors), offline. Where their files are is core/model_files.py's to say, torch-free.
kernels.py puts liger-kernel's fused kernels on a loaded model's modules (the CUDA training path
and the CUDA decode both use it). blocks.py finds a model's decoder layers.

Imports: core, and torch / transformers inside the functions that load.
"""
