"""CPU decode speed per weight format on the torch backend, against this machine's own memory-bandwidth floor.

    python bench/cpu_decode.py                                    # gpt2-medium, fp32 bf16 fp16 int8 int4, batch 1 and 8
    python bench/cpu_decode.py --formats fp32 int8 --batch 1 --repeats 5

Decode at small batches reads every weight once a step, so its ceiling is ``bandwidth / bytes read per step``
(the block weights in their stored format, the LM head, the K/V cache at the mean context). The script measures
the read bandwidth first (the best of a few sums over a tensor far larger than the caches), then for each format and
batch: greedy generation (``ignore_eos``) of ``--new-tokens`` after ``--prompt-len`` random tokens per sequence,
random weights (``load_format="dummy"``), timed per engine step: the first step is the prefill (prefill tok/s), the
rest are decode steps (decode tok/s). Medians over ``--repeats`` runs with fresh prompts, after one warm-up run.
``measure_decode`` is the one measuring function; other benchmarks (a llama.cpp comparison) import it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import PRESETS, ModelConfig  # noqa: E402

# name -> (dtype, quantization) of the formats this benchmark knows
FORMATS = {
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "fp16": ("float16", None),
    "int8": ("float32", "int8"),
    "int4": ("float32", "int4"),
}
# bytes read per weight of a block linear; int8 adds a scale per output row, int4 a (scale, offset) pair per group
WEIGHT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """This machine's memory read bandwidth in bytes/s: the best of ``repeats`` sums over a ``megabytes`` tensor."""
    x = torch.ones(megabytes << 18)  # 4-byte floats
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * x.element_size() / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bytes_per_step(config: ModelConfig, dtype: str, quantization: str | None, batch: int, context: int) -> float:
    """Bytes a decode step reads: the block linears in their stored format, the LM head (never quantized, in the
    model's dtype), each sequence's K/V over ``context`` tokens. Embedding rows, biases and norms are noise."""
    d, f, v, n_layer = config.n_embd, config.d_ff, config.vocab_size, config.n_layer
    block_params = n_layer * (3 * d * d + d * d + f * d + d * f)
    act = WEIGHT_BYTES[dtype]
    per_weight = WEIGHT_BYTES[quantization or dtype]
    kv = batch * context * n_layer * 2 * d * act
    return block_params * per_weight + v * d * act + kv


def measure_decode(model: str | LLM, dtype: str = "float32", quantization: str | None = None, batch: int = 1,
                   prompt_tokens: int = 32, new_tokens: int = 64, repeats: int = 3) -> dict:  # fmt: skip
    """Prefill and decode tokens/s of our torch backend on CPU: greedy, ``ignore_eos``, random prompts.

    ``model`` is a preset name (random weights) or a checkpoint directory, loaded with ``dtype`` and
    ``quantization``, or an ``LLM`` already built (its own dtype and quantization then apply). Returns
    ``{"prefill_tok_s", "decode_tok_s", "prefill_runs", "decode_runs"}`` (medians, and every run's rate).
    """
    llm = model if isinstance(model, LLM) else build(model, dtype, quantization, batch)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    vocab = llm.config.vocab_size
    prefill, decode = [], []
    for run in range(repeats + 1):  # run 0 warms up
        for i in range(batch):
            engine.add_request(f"{run}-{i}", torch.randint(0, vocab, (prompt_tokens,)).tolist(), params)
        t_prefill = _timed(engine.step)  # the prompts' step: each sequence's first token
        start = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        t_decode = time.perf_counter() - start
        if steps != new_tokens - 1:
            raise RuntimeError(f"expected {new_tokens - 1} decode steps, ran {steps} (the prefill did not fit a step?)")
        if run:
            prefill.append(batch * prompt_tokens / t_prefill)
            decode.append(batch * (new_tokens - 1) / t_decode)
    return {
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "prefill_runs": prefill,
        "decode_runs": decode,
    }


def build(model: str, dtype: str, quantization: str | None, max_batch: int) -> LLM:
    """Our engine on CPU (torch backend): random weights for a preset name, else the checkpoint at ``model``."""
    load_format = "dummy" if model in PRESETS else "auto"
    return LLM(model, backend="torch", device="cpu", dtype=dtype, quantization=quantization, load_format=load_format,
               max_num_seqs=max_batch, enable_prefix_caching=False, progress=False)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-medium", help="a preset (random weights) or a checkpoint directory")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if min(args.batch) < 1 or args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1 or args.threads < 1:
        print("batch, prompt-len, repeats and threads must be >= 1, new-tokens >= 2", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    print(f"{args.model} on CPU ({torch.get_num_threads()} threads, torch {torch.__version__}), prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s")  # fmt: skip
    print(f"{'format':>6} {'batch':>5} {'prefill tok/s':>13} {'decode tok/s':>12} {'floor tok/s':>11} {'of floor':>8}")
    for name in args.formats:
        dtype, quantization = FORMATS[name]
        llm = build(args.model, dtype, quantization, max(args.batch))
        for batch in args.batch:
            r = measure_decode(llm, batch=batch, prompt_tokens=args.prompt_len, new_tokens=args.new_tokens,
                               repeats=args.repeats)  # fmt: skip
            context = args.prompt_len + args.new_tokens // 2
            floor = batch * bandwidth / bytes_per_step(llm.config, dtype, quantization, batch, context)
            print(f"{name:>6} {batch:>5} {r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.1f} {floor:>11.1f} "
                  f"{r['decode_tok_s'] / floor:>7.0%}", flush=True)  # fmt: skip
        del llm
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
