"""Autotuning candidates of the implicit-GEMM convolution kernels (alexnet_fast/triton/conv.py).

Rows are (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for Hopper (227 KB of shared memory
per block, wgmma on 64-row warpgroups). Compiled for sm_90 with 16-bit operands, none spills
registers in the channel-block K layout and a few spill under 100 bytes in the flat one.
Float32 operands take twice the bytes per element, so their rows halve the block along the
GEMM's reduction dimension and keep each pipeline stage the same size.
Triton's autotuner times the candidates once per shape key and caches the winner.

Under the CPU interpreter (``TRITON_INTERPRET=1``) one configuration is used: the interpreter's
cost is per tile operation, so fairly large tiles keep the tests fast (AlexNet's layers at 67x67
input take ~45 s instead of ~12 min with 32x16x16 tiles), and its three block sizes differ so a
transposed index gives a wrong answer.
"""
import triton

from alexnet_fast.backends import autotune_enabled

_INTERPRETER = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=1)]

# Pixels (M) x output channels (N) x K = (kh, kw, c_in).
_FORWARD = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 128, 8, 3),
    (64, 64, 64, 4, 3),
]
# Input pixels of one stride phase (M) x input channels (N) x K = (tap, c_out); strided layers
# only (a stride-1 input gradient runs the forward kernel and its configs). Narrow N tiles fit
# C_in=96 without padding.
_BACKWARD_INPUT = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 8, 4),
    (128, 64, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (64, 128, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 32, 4, 4),
    (128, 32, 64, 4, 4),
    (256, 32, 64, 8, 3),
    (64, 64, 64, 4, 3),
]
# Output channels (N) x K columns (kh, kw, c_in), reducing over pixels in steps of BLOCK_M.
# BLOCK_K=32 tiles C_in=96 per tap without padding.
_BACKWARD_WEIGHT = [
    (64, 128, 128, 8, 3),
    (64, 128, 128, 8, 4),
    (32, 128, 128, 8, 4),
    (64, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (64, 128, 32, 8, 3),
    (128, 128, 32, 8, 3),
    (32, 128, 256, 8, 3),
    (32, 64, 128, 4, 4),
    (64, 64, 64, 4, 3),
]

# The weight gradient on the pixel grid: output channels (M) x K columns (N), reducing over grid
# rows in steps of BLOCK_K. Five of the seven tiles timed on the H200 for conv2-conv5 in bf16
# (BENCHMARKS.md); the two left out were among the slowest on every layer.
_BACKWARD_WEIGHT_GRID = [
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
]


def _configs(rows, itemsize: int, reduction: str, interpreted: bool):
    if interpreted:
        return _INTERPRETER
    configs, seen = [], set()
    for m, n, k, warps, stages in rows:
        block = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}
        block[reduction] //= itemsize // 2
        key = (*block.values(), warps, stages)
        if key not in seen:
            seen.add(key)
            configs.append(triton.Config(block, num_warps=warps, num_stages=stages))
    return configs if autotune_enabled() else configs[:1]


def forward(itemsize: int, interpreted: bool):
    return _configs(_FORWARD, itemsize, "BLOCK_K", interpreted)


def backward_input(itemsize: int, interpreted: bool):
    return _configs(_BACKWARD_INPUT, itemsize, "BLOCK_K", interpreted)


def backward_weight(itemsize: int, interpreted: bool):
    return _configs(_BACKWARD_WEIGHT, itemsize, "BLOCK_M", interpreted)


def backward_weight_grid(itemsize: int, interpreted: bool):
    return _configs(_BACKWARD_WEIGHT_GRID, itemsize, "BLOCK_K", interpreted)
