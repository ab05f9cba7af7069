"""Triton kernels, registered as ops of the ``alexnet_fast_triton`` namespace with
``torch.library.triton_op`` (so torch.compile sees the kernels) and the same schemas, autograd
formulas (``alexnet_fast.autograd``) and call signatures as the native ``alexnet_fast`` ops.

Modules: ``conv`` (implicit-GEMM conv+bias+ReLU), ``norm`` (LRN and the fused LRN->max-pool),
``pool`` (overlapping max-pool). Each defines and registers its ops on import.
"""
import torch

from alexnet_fast.triton import conv, norm, pool  # noqa: F401  (importing defines the ops)

_ops = torch.ops.alexnet_fast_triton
conv2d_relu = _ops.conv2d_relu
lrn = _ops.lrn
max_pool2d = _ops.max_pool2d
lrn_max_pool2d = _ops.lrn_max_pool2d
