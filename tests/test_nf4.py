"""The NF4 dequantisation in plain ops (engine/cuda/lora_train.py) against bitsandbytes' layout."""

from types import SimpleNamespace

import pytest
import torch
from tunebench.engine.cuda.lora_train import dequantize_nf4, nf4_fusable

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), float32
NF4 = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip


def quant_state(shape, blocksize=64, nested=True, seed=0):
    """Random packed codes and scales in bitsandbytes' layout, built without bitsandbytes."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    packed = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, generator=g)
    blocks = n // blocksize
    if nested:
        inner = SimpleNamespace(
            code=torch.linspace(-1, 1, 256),  # any 256-entry float32 map
            absmax=torch.rand(blocks // 256, generator=g) * 0.05,
            blocksize=256,
        )
        absmax = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g)
        offset = torch.tensor(0.03)
    else:
        inner, offset = None, None
        absmax = torch.rand(blocks, generator=g) * 0.05
    state = SimpleNamespace(
        code=NF4, absmax=absmax, blocksize=blocksize, quant_type="nf4", shape=torch.Size(shape),
        nested=nested, state2=inner, offset=offset,
    )  # fmt: skip
    return packed, state


def reference(packed, state, dtype):
    """Element by element: element i is nibble i % 2 of byte i // 2 (high first), scaled by its block."""
    n = state.shape.numel()
    i = torch.arange(n)
    byte = packed.reshape(-1)[i // 2].long()
    nibble = torch.where(i % 2 == 0, byte // 16, byte % 16)
    scales = state.absmax
    if state.nested:
        j = torch.arange(scales.numel())
        scales = state.state2.code[scales.long()] * state.state2.absmax[j // 256] + state.offset
    return (state.code[nibble] * scales[i // state.blocksize]).to(dtype).reshape(state.shape)


@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_nf4_follows_bitsandbytes_layout(nested):
    packed, state = quant_state((512, 256), nested=nested)
    assert nf4_fusable(state)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        got = dequantize_nf4(packed, state, dtype)
        assert got.dtype == dtype and got.shape == (512, 256)
        assert torch.equal(got, reference(packed, state, dtype))


def test_shapes_that_do_not_tile_go_to_bitsandbytes():
    _, state = quant_state((512, 256))
    assert not nf4_fusable(SimpleNamespace(**{**vars(state), "shape": torch.Size((3, 37))}))
    assert not nf4_fusable(SimpleNamespace(**{**vars(state), "shape": torch.Size((64, 64))}))  # 64 blocks
    assert not nf4_fusable(SimpleNamespace(**{**vars(state), "quant_type": "fp4"}))


def test_dequantize_nf4_compiles_to_the_same_values():
    packed, state = quant_state((256, 256))
    compiled = torch.compile(lambda p: dequantize_nf4(p, state, torch.bfloat16), fullgraph=True)
    assert torch.equal(compiled(packed), reference(packed, state, torch.bfloat16))


def test_equals_bitsandbytes_own_dequantisation():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(1024, 512, dtype=torch.bfloat16) * 0.02
    for nested in (True, False):
        packed, state = bnb_functional.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
        assert nf4_fusable(state)
        want = bnb_functional.dequantize_4bit(packed, state)
        assert torch.equal(dequantize_nf4(packed, state, torch.bfloat16), want)
