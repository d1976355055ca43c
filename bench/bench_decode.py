"""Decode throughput of gpt2-triton vs transformers' ``generate()`` (with its KV cache), same weights and prompts.

    python bench/bench_decode.py                      # gpt2-medium, float32, CPU, batch 1 and 8
    python bench/bench_decode.py --model gpt2 --batch 1 4 16 --new-tokens 64
    python bench/bench_decode.py --beams 4            # beam search: ours vs generate(num_beams=4)
    python bench/bench_decode.py --speculative 4      # n-gram speculation: ours vs generate(prompt_lookup_num_tokens=4)
    python bench/bench_decode.py --speculative 4 --draft-model gpt2   # a draft model: vs generate(assistant_model=)
    python bench/bench_decode.py --lora 16            # a rank-16 LoRA adapter on every linear: ours vs PEFT's model
    python bench/bench_decode.py --lora 16 --num-loras 4 --batch 4 8   # 4 adapters mixed in each batch

Both sides first generate greedily (or, with ``--beams K``, by beam search of K beams) from the same checkpoint
and must agree token for token (validate, then time). Decode throughput excludes the prefill:
``B * (N - 1) / (t(N new tokens) - t(1 new token))``, the median over ``--repeats`` runs of each.

``--speculative K`` speculates K tokens by n-gram lookup on both sides (transformers' prompt lookup decoding, at
batch 1 only) and prints our rate without speculation and our drafts' acceptance rate too. Random weights make
greedy text repeat itself more than a trained model's does, so the drafts are accepted more often than on real
text: compare the two engines at the same acceptance, not the speed-up itself. With ``--draft-model PRESET`` a
smaller GPT-2 (random weights too) drafts instead, on both sides (transformers' assisted generation, K drafts a
step). Two independent random models agree on almost no token, which measures what drafting costs; a draft made of
the target's own first N blocks (``--draft-model layers:N``, with its embeddings and head) agrees on many, more
than a trained gpt2 would with a trained gpt2-medium: neither is the acceptance of real checkpoints.

``--lora R`` gives every prompt a random PEFT LoRA adapter of rank R on ``c_attn``, ``c_proj`` and ``c_fc``: ours
serves it from its adapter slots (``enable_lora``), transformers runs PEFT's model (the update computed beside
each linear, unmerged), and our rate without the adapter shows what it costs. ``--num-loras K`` makes K adapters,
prompt i under adapter i mod K: ours mixes them in each step, PEFT in each batch (``generate(adapter_names=...)``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, BeamSearchParams, LoRARequest, SamplingParams  # noqa: E402
from engine.config import PRESETS  # noqa: E402

LOOKUP_MAX = 4  # longest n-gram looked up, on both sides (transformers' max_matching_ngram_size)


def timed(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(config: dict, device: str, dtype: str, engines: dict[str, dict], max_batch: int) -> tuple[object, dict]:
    """transformers' GPT-2 with random weights, and an ``LLM`` per entry of ``engines`` (label -> ``LLM``
    keyword arguments, e.g. ``{"triton": dict(backend="triton")}``) loading the very same weights.

    The transformers model is returned in float32 on ``device`` (callers cast it as they need).
    """
    hf = random_gpt2(config).to(device)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        llms = {label: LLM(d, device=device, dtype=dtype, progress=False, max_num_seqs=max_batch, **kw)
                for label, kw in engines.items()}  # fmt: skip
    return hf, llms


def random_gpt2(config: dict, seed: int = 0):
    """transformers' GPT-2 of ``config`` with random weights drawn from ``seed`` (the target's: 0), float32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**config)).eval()


def ours(llm: LLM, loras: list[LoRARequest] | None = None) -> Callable[[list[list[int]], int], list[list[int]]]:
    """Greedy generation of ``n`` tokens per prompt with our engine (prompt i under ``loras[i % len(loras)]``)."""

    def run(ids: list[list[int]], n: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        per_prompt = [loras[i % len(loras)] for i in range(len(ids))] if loras else None
        outs = llm.generate(ids, params, use_tqdm=False, lora_request=per_prompt)
        return [o.outputs[0].token_ids for o in outs]

    return run


def add_adapters(hf, rank: int, directory: str, count: int = 1, std: float = 0.02):
    """Make ``hf`` PEFT's model with ``count`` random LoRAs of ``rank`` on every block linear (A and B drawn from
    N(0, std), B too, which PEFT starts at zero), saved under ``directory``; returns that model and the requests
    naming them (PEFT's adapter names are the requests' names)."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["c_attn", "c_proj", "c_fc"],
                             init_lora_weights=False, fan_in_fan_out=True)  # fmt: skip
    names = [f"lora{i}" for i in range(count)]
    model = peft.get_peft_model(hf, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    model.save_pretrained(directory)  # each adapter in a directory of its name
    return model.eval(), [LoRARequest(name, i + 1, str(Path(directory) / name)) for i, name in enumerate(names)]


def theirs_adapters(peft_model, loras: list[LoRARequest]) -> Callable[[list[list[int]], int], list[list[int]]]:
    """PEFT's greedy ``generate``, prompt i under adapter ``loras[i % len(loras)]`` (its mixed-batch inference)."""

    def run(ids: list[list[int]], n: int) -> list[list[int]]:
        names = [loras[i % len(loras)].lora_name for i in range(len(ids))]
        return theirs(peft_model, adapter_names=names)(ids, n)

    return run


def theirs(hf, **generate_kwargs) -> Callable[[list[list[int]], int], list[list[int]]]:
    """Greedy generation of ``n`` tokens per prompt with transformers' ``generate`` (its KV cache), given
    ``generate_kwargs`` too."""

    def run(ids: list[list[int]], n: int) -> list[list[int]]:
        x = torch.tensor(ids, device=hf.device)
        with torch.inference_mode():
            out = hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones_like(x), **generate_kwargs)  # fmt: skip
        return out[:, x.shape[1] :].tolist()

    return run


def ours_beams(llm: LLM, width: int) -> Callable[[list[list[int]], int], list[list[list[int]]]]:
    """Beam search of ``width`` beams, ``n`` tokens after each prompt, with our engine: each prompt's beams."""

    def run(ids: list[list[int]], n: int) -> list[list[list[int]]]:
        out = llm.beam_search(ids, BeamSearchParams(width, n, ignore_eos=True), use_tqdm=False)
        return [[seq.tokens[len(p) :] for seq in o.sequences] for p, o in zip(ids, out)]

    return run


def theirs_beams(hf, width: int) -> Callable[[list[list[int]], int], list[list[list[int]]]]:
    """transformers' ``generate(num_beams=width, do_sample=False)``: each prompt's beams."""

    def run(ids: list[list[int]], n: int) -> list[list[list[int]]]:
        x = torch.tensor(ids, device=hf.device)
        with torch.inference_mode():
            out = hf.generate(x, max_new_tokens=n, num_beams=width, num_return_sequences=width, do_sample=False,
                              eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(x))  # fmt: skip
        rows = out[:, x.shape[1] :].tolist()
        return [rows[i * width : (i + 1) * width] for i in range(len(ids))]

    return run


def theirs_lookup(hf, num_tokens: int, longest: int) -> Callable[[list[list[int]], int], list[list[int]]]:
    """transformers' greedy ``generate`` with prompt lookup decoding (``num_tokens`` drafts from n-grams of up to
    ``longest`` tokens), one prompt at a time: its assisted generation takes batch 1 only."""
    greedy = theirs(hf, prompt_lookup_num_tokens=num_tokens, max_matching_ngram_size=longest)

    def run(ids: list[list[int]], n: int) -> list[list[int]]:
        return [row for one in ids for row in greedy([one], n)]

    return run


def theirs_assisted(hf, draft, num_tokens: int) -> Callable[[list[list[int]], int], list[list[int]]]:
    """transformers' greedy ``generate`` with ``draft`` as its assistant model, ``num_tokens`` drafts a step (no
    dynamic schedule, no confidence cut), one prompt at a time as its assisted generation takes them."""
    draft.generation_config.num_assistant_tokens = num_tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    greedy = theirs(hf, assistant_model=draft)

    def run(ids: list[list[int]], n: int) -> list[list[int]]:
        return [row for one in ids for row in greedy([one], n)]

    return run


def decode_rate(fn, ids: list[list[int]], new_tokens: int, repeats: int) -> float:
    """Decode tokens/s without the prefill: ``B * (N - 1) / (t(N new tokens) - t(1 new token))``."""
    t_n = timed(fn, ids, new_tokens, repeats=repeats)
    t_1 = timed(fn, ids, 1, repeats=repeats)
    return len(ids) * (new_tokens - 1) / (t_n - t_1) if t_n > t_1 else float("nan")  # nan: lost in the noise


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
    ap.add_argument("--beams", type=int, default=0, help="beam search of this many beams instead of greedy")
    ap.add_argument("--speculative", type=int, default=0, help="speculate this many tokens by n-gram lookup")
    ap.add_argument("--draft-model", type=draft_name, metavar="PRESET|layers:N",
                    help="with --speculative: drafted by this model (or the target's first N blocks)")  # fmt: skip
    ap.add_argument("--lora", type=int, default=0, metavar="RANK", help="every prompt with a LoRA adapter of RANK")
    ap.add_argument("--num-loras", type=int, default=1, help="with --lora: this many adapters, mixed in each batch")
    args = ap.parse_args(argv)
    if sum(map(bool, (args.beams, args.speculative, args.lora))) > 1:
        ap.error("--beams, --speculative and --lora do not combine")
    if args.draft_model and not args.speculative:
        ap.error("--draft-model needs --speculative K")
    with tempfile.TemporaryDirectory() as scratch:  # adapters (read at the first request), the draft model
        return run_benchmark(args, scratch)


def draft_name(text: str) -> str:
    """An argparse type: a preset's name, or ``layers:N`` with N >= 1."""
    count = text.removeprefix("layers:")
    if text in PRESETS or (count != text and count.isdigit() and int(count) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(PRESETS)} or layers:N, got {text!r}")


def save_draft(name: str, target: str, directory: str, device: str, dtype: str):
    """The draft ``name`` saved to ``directory`` (for our engine), and the same model (for transformers): a random
    preset GPT-2, or ``layers:N``, the ``target`` preset's first N blocks with its embeddings and head."""
    if name.startswith("layers:"):
        target_model = random_gpt2(PRESETS[target])
        draft = random_gpt2({**PRESETS[target], "n_layer": int(name.removeprefix("layers:"))})
        draft.load_state_dict(target_model.state_dict(), strict=False)  # the blocks past N are left out
    else:
        draft = random_gpt2(PRESETS[name], seed=1)
    draft.save_pretrained(directory)
    return draft.to(device=device, dtype=getattr(torch, dtype))


def run_benchmark(args, scratch: str) -> int:
    engines = {"ours": dict(backend=args.backend)}
    if args.lora:
        engines["ours"].update(enable_lora=True, max_lora_rank=args.lora, max_loras=args.num_loras)
    draft = None
    if args.speculative:
        config = dict(num_speculative_tokens=args.speculative, prompt_lookup_max=LOOKUP_MAX)
        if args.draft_model:
            draft = save_draft(args.draft_model, args.model, str(Path(scratch) / "draft"), args.device, args.dtype)
            config = dict(num_speculative_tokens=args.speculative, model=str(Path(scratch) / "draft"))
        engines["speculative"] = dict(backend=args.backend, speculative_config=config)
    hf, llms = build(PRESETS[args.model], args.device, args.dtype, engines, max(args.batch) * max(1, args.beams))
    llm = llms["ours"]
    hf = hf.to(getattr(torch, args.dtype))
    loras = None
    if args.lora:
        hf, loras = add_adapters(hf, args.lora, scratch, args.num_loras)
    print(f"{args.model} {args.dtype} on {args.device}, backend={llm.backend}, threads={torch.get_num_threads()}, "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats}"
          + (f", beam search of {args.beams} beams (tok/s: steps/s x batch)" if args.beams else "")
          + (f", {args.speculative} speculative tokens (transformers: one prompt at a time)"
             if args.speculative else "")
          + (f" drafted by {args.draft_model} (random weights)" if draft is not None else "")
          + (f", {args.num_loras} rank-{args.lora} LoRAs (transformers: PEFT)" if args.lora else ""))  # fmt: skip
    if args.beams:
        fns = (ours_beams(llm, args.beams), theirs_beams(hf, args.beams))
    elif args.speculative:
        peer = theirs_assisted(hf, draft, args.speculative) if draft is not None else (
            theirs_lookup(hf, args.speculative, LOOKUP_MAX))  # fmt: skip
        fns = (ours(llms["speculative"]), peer, ours(llm))
    elif args.lora:
        fns = (ours(llm, loras), theirs_adapters(hf, loras), ours(llm))
    else:
        fns = (ours(llm), theirs(hf))
    extra = f" {'ours, no spec tok/s':>20} {'accepted':>8}" if args.speculative else ""
    extra += f" {'ours, no LoRA tok/s':>20}" if args.lora else ""
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6}{extra}")
    for B in args.batch:
        ids = torch.randint(0, hf.config.vocab_size, (B, args.prompt_len)).tolist()
        a, b = fns[0](ids, 8), fns[1](ids, 8)
        agree = sum(x == y for x, y in zip(a, b))
        if agree < B:
            print(f"  warning: tokens differ for {B - agree}/{B} prompts (fp near-ties?)", file=sys.stderr)
        rates = [decode_rate(fn, ids, args.new_tokens, args.repeats) for fn in fns]
        line = f"{B:>5} {rates[0]:>11.1f} {rates[1]:>19.1f} {rates[0] / rates[1]:>5.2f}x"
        if args.speculative:
            accepted = llms["speculative"].llm_engine.get_stats().spec_decode_acceptance_rate
            line += f" {rates[2]:>20.1f} {accepted:>8.0%}"
        if args.lora:
            line += f" {rates[2]:>20.1f}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
