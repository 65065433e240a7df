"""The fast CUDA training path (path.py) and its parts: packing, the fused loss, LoRA for training,
host offload.

Imports: core and train; torch, and liger-kernel / bitsandbytes where installed.
"""
