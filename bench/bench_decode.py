"""Decode throughput of gpt2-triton vs transformers' ``generate()`` (with its KV cache), same weights and prompts.

    python bench/bench_decode.py                      # gpt2-medium, float32, CPU, batch 1 and 8
    python bench/bench_decode.py --model gpt2 --batch 1 4 16 --new-tokens 64

Both sides first generate greedily from the same checkpoint and must agree token for token (validate, then
time). Decode throughput excludes the prefill: ``B * (N - 1) / (t(N new tokens) - t(1 new token))``, the
median over ``--repeats`` runs of each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import PRESETS  # noqa: E402


def timed(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-medium", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**PRESETS[args.model])).eval()
    dtype = getattr(torch, args.dtype)
    hf = hf.to(device=args.device, dtype=dtype)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        llm = LLM(d, backend=args.backend, device=args.device, dtype=args.dtype, progress=False,
                  max_num_seqs=max(args.batch))  # fmt: skip

    def ours(ids: list[list[int]], n: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(ids, params, use_tqdm=False)]

    def theirs(ids: list[list[int]], n: int) -> list[list[int]]:
        x = torch.tensor(ids, device=args.device)
        with torch.inference_mode():
            out = hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones_like(x))  # fmt: skip
        return out[:, x.shape[1] :].tolist()

    print(f"{args.model} {args.dtype} on {args.device}, backend={llm.backend}, threads={torch.get_num_threads()}, "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats}")  # fmt: skip
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6}")
    for B in args.batch:
        ids = torch.randint(0, 50257, (B, args.prompt_len)).tolist()
        a, b = ours(ids, 8), theirs(ids, 8)
        agree = sum(x == y for x, y in zip(a, b))
        if agree < B:
            print(f"  warning: greedy tokens differ for {B - agree}/{B} prompts (fp near-ties?)", file=sys.stderr)
        rates = []
        for fn in (ours, theirs):
            t_n = timed(fn, ids, args.new_tokens, repeats=args.repeats)
            t_1 = timed(fn, ids, 1, repeats=args.repeats)
            rates.append(B * (args.new_tokens - 1) / (t_n - t_1))
        print(f"{B:>5} {rates[0]:>11.1f} {rates[1]:>19.1f} {rates[0] / rates[1]:>5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
