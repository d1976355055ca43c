"""Compile specs of :mod:`kernels.paged_attention` (decode over the paged cache)."""

from __future__ import annotations

from kernels.paged_attention import BLOCK_P, _decode_partition_kernel, _decode_reduce_kernel, configs_for
from kernels.specs import TL_TYPES, KernelSpec
from kernels.utils import FLOAT_DTYPES


def compile_specs() -> list[KernelSpec]:
    """Every shipped config for every dtype at hd=64 (block size 16 partitioned, 32 single), and the merge."""
    specs = []
    for dtype in FLOAT_DTYPES:
        t = TL_TYPES[dtype]
        signature = {"Q": f"*{t}", "K_cache": f"*{t}", "V_cache": f"*{t}", "block_tables": "*i32"}
        signature |= {"context_lens": "*i32", "Out": f"*{t}", "part_max": "*fp32", "part_sum": "*fp32"}
        # q/out strides are multiples of 16 for every GPT-2 width; the table width and H need not be.
        signature |= {"part_acc": "*fp32", "stride_qb": "i32:16", "stride_qh": "i32:16", "stride_bt": "i32"}
        signature |= {"stride_ob": "i32:16", "stride_oh": "i32:16", "H": "i32", "num_partitions": "i32"}
        signature |= {"partition_size": "i32", "max_context_len": "i32", "qk_scale": "fp32"}
        for config in configs_for(dtype):
            for block_size, single in ((16, False), (32, True)):
                specs.append(
                    KernelSpec(
                        name=f"decode_attention[{t},hd=64,bs={block_size},single={single}] BLOCK_N={config.block_n} "
                        f"warps={config.num_warps} stages={config.num_stages}",
                        fn=_decode_partition_kernel,
                        signature=dict(signature),
                        constexprs=dict(HEAD_DIM=64, BLOCK_SIZE=block_size, SINGLE=single, BLOCK_N=config.block_n),
                        num_warps=config.num_warps,
                        num_stages=config.num_stages,
                    )
                )
        reduce_signature = {"context_lens": "*i32", "part_max": "*fp32", "part_sum": "*fp32", "part_acc": "*fp32"}
        reduce_signature |= {"Out": f"*{t}", "stride_ob": "i32:16", "stride_oh": "i32:16", "H": "i32"}
        reduce_signature |= {"num_partitions": "i32", "partition_size": "i32", "max_context_len": "i32"}
        specs.append(
            KernelSpec(
                name=f"decode_attention_reduce[{t},hd=64] BLOCK_P={BLOCK_P}",
                fn=_decode_reduce_kernel,
                signature=reduce_signature,
                constexprs={"HEAD_DIM": 64, "BLOCK_P": BLOCK_P},
                num_warps=4,
                num_stages=1,
            )
        )
    return specs
