"""Hand-written Triton kernels for GPT-2, one module per op family (see CONTRIBUTING.md, "Where things live").

Importing this package imports nothing else (no triton): ``engine.triton_ops`` reads ``KERNEL_MODULES`` before it
decides whether the kernel modules load compiled or in Triton's interpreter.
"""

# The op families, each ``kernels/<name>.py`` with its compile specs in ``kernels/specs/<name>.py``: what the
# Triton backend, the compile gate and bench/gpu_check.py import.
KERNEL_MODULES = (
    "layernorm",
    "gelu",
    "linear",
    "quant",
    "attention",
    "paged_attention",
    "context_attention",
    "kv_cache",
    "lora",
)
