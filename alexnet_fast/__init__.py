"""AlexNet on hand-written CUDA C++ and Triton kernels (fused conv+bias+ReLU, LRN, max-pool)."""
from alexnet_fast import ops
from alexnet_fast.backends import get_backend, set_backend, use_backend
from alexnet_fast.info import info
from alexnet_fast.model import AlexNet, load_seed_state_dict

__all__ = ["AlexNet", "ops", "set_backend", "get_backend", "use_backend", "info", "load_seed_state_dict"]
__version__ = "0.1.0"
