"""The fast CUDA training path (path.py) and its parts: packing, the fused loss, LoRA for training,
host offload, what each decoder layer gets (layers.py: its recompute switch, MLPs in slices) and
torch.compile of the layers with its cache across runs (compiling.py).

Imports: core, and from train only types.py and plain.py (never the recipe, which calls this
wing); torch, and liger-kernel / bitsandbytes where installed.
"""
