"""Autotuning candidates of the implicit-GEMM convolution kernels (alexnet_fast/triton/conv.py).

Tiles suited to Hopper (228 KB of shared memory per SM, wgmma on 64-row warpgroups): 128-256
wide output tiles and 3-4 pipeline stages for the channel-rich layers, narrower tiles for the
thin ones; Triton's autotuner times them once per shape key and caches the winner. Under the
CPU interpreter (``TRITON_INTERPRET=1``) one small configuration keeps the tests fast; its three
block sizes differ so a transposed index shows up as a wrong answer.
"""
import triton

_INTERPRETER = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]


def _configs(rows):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in rows]


def forward(interpreted: bool):
    """Pixels (M) x output channels (N) x K blocks; also the shape of the input-gradient GEMM
    (pixels x input channels x output-channel blocks)."""
    if interpreted:
        return _INTERPRETER
    return _configs([
        (128, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 128, 8, 3),
        (64, 64, 64, 4, 3),
    ])


def backward_input(interpreted: bool):
    return forward(interpreted)


def backward_weight(interpreted: bool):
    """Output channels (N) x K columns, reducing over pixel blocks (BLOCK_M)."""
    if interpreted:
        return _INTERPRETER
    return _configs([
        (64, 128, 128, 8, 3),
        (32, 128, 128, 8, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 128, 4, 4),
        (128, 128, 128, 8, 3),
        (64, 128, 256, 8, 3),
        (64, 64, 64, 4, 3),
    ])
