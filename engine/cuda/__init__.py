"""The fast CUDA training path (path.py) and its parts: packing, the fused loss, LoRA for training,
host offload.

Imports: core, and from train only types.py and plain.py (never the recipe, which calls this
wing); torch, and liger-kernel / bitsandbytes where installed.
"""
