"""Offline throughput of gpt2-triton's serving engine vs transformers, same weights and prompts (vLLM's
``benchmarks/benchmark_throughput.py`` in shape).

    python bench/throughput.py                                  # gpt2, random weights, fp32, CPU: both scenarios
    python bench/throughput.py --scenario random --num-prompts 64 --input-len 256 --output-len 128
    python bench/throughput.py --scenario prefix --max-num-batched-tokens 1024 --peers generate_batch
    python bench/throughput.py --model ./gpt2-medium --n 4 --output-json /tmp/tp.json
    python bench/throughput.py --scenario prefix --model gpt2-medium --speculative-config '{"model": "gpt2",
        "num_speculative_tokens": 4}'                           # ours speculating (the draft's weights random too)

Requests are random token ids (no tokenizer): prompt and output lengths drawn uniformly in
``[len * (1 - r), len * (1 + r)]`` (vLLM's random dataset), after a random ``--prefix-len`` prefix that every prompt
shares. Every completion generates exactly its output length (EOS ignored), so all systems do the same work and
throughputs compare as times. Scenarios:

* ``random``: ours (``LLM.generate``, one call for all requests) vs transformers ``generate`` in padded batches and
  transformers' continuous batching (the manager under ``generate_batch``, paged attention);
* ``prefix``: ours with ``enable_prefix_caching`` on and off: prompt tokens computed and end-to-end time (and the
  peers, with ``--peers``).

Before timing, each system completes a couple of fresh requests greedily and must produce transformers' tokens
(unpadded ``generate``, one prompt at a time), or leave them only at a near-tie of the dtype (``NEAR_TIE``: in bf16
transformers' own padded batches break some of its unpadded picks). Weights: ``--load-format dummy`` (the default
for a preset) saves transformers' randomly initialised model as a checkpoint that both sides load.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import LLM, SamplingParams  # noqa: E402
from engine.cli import add_speculative_arg  # noqa: E402
from engine.config import PRESETS  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PEERS = ("generate", "generate_batch")
# Default sizes: a whole default run (both scenarios, their default peers) takes about 3 minutes on 2 CPU cores
# (gpt2, fp32). Padded generate then runs two batches of 16.
SCENARIOS = {
    "random": dict(num_prompts=32, input_len=64, output_len=48, range_ratio=0.5, prefix_len=0),
    "prefix": dict(num_prompts=16, input_len=64, output_len=16, range_ratio=0.5, prefix_len=512),
}
# What the issue asks for, as (scenario, label, key in the scenario's ratios, at least).
GOALS = [
    ("random", "output tokens/s vs padded generate", "ours/generate", 3.0),
    ("random", "output tokens/s vs generate_batch", "ours/generate_batch", 2.0),
    ("prefix", "prompt tokens computed, fewer with prefix caching", "prompt_tokens_computed_off/on", 4.0),
    ("prefix", "end-to-end speedup of prefix caching", "prefix_caching_speedup", 2.0),
]


# ---------------------------------------------------------------------------------------------------- workload
@dataclass
class Workload:
    """The requests of one scenario: prompts (token ids) and the exact number of tokens each completion generates."""

    prompts: list[list[int]]
    output_lens: list[int]
    n: int
    prefix_len: int

    @property
    def sampling(self) -> bool:
        """Greedy for n = 1; n > 1 samples at temperature 1 (greedy would give n copies of one completion)."""
        return self.n > 1

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens) * self.n

    def describe(self) -> dict:
        ins = [len(p) - self.prefix_len for p in self.prompts]
        return dict(
            num_prompts=len(self.prompts), n=self.n, prefix_len=self.prefix_len,
            input_len_min=min(ins), input_len_max=max(ins), input_len_mean=sum(ins) / len(ins),
            output_len_min=min(self.output_lens), output_len_max=max(self.output_lens),
            output_len_mean=sum(self.output_lens) / len(self.output_lens),
            prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens,
            sampling="temperature 1.0, top-k/top-p off" if self.sampling else "greedy",
        )  # fmt: skip


def uniform_lengths(mean: int, ratio: float, count: int, gen: torch.Generator, low_at_least: int) -> list[int]:
    """``count`` lengths uniform in ``[mean * (1 - ratio), mean * (1 + ratio)]`` (vLLM's random dataset)."""
    low, high = max(low_at_least, int(mean * (1 - ratio))), max(low_at_least, int(mean * (1 + ratio)))
    return torch.randint(low, high + 1, (count,), generator=gen).tolist()


def make_workload(sizes: dict, n: int, vocab_size: int, seed: int) -> Workload:
    """Random prompts after one shared random prefix; output lengths drawn the same way."""
    gen = torch.Generator().manual_seed(seed)
    count, prefix_len = sizes["num_prompts"], sizes["prefix_len"]
    prefix = torch.randint(0, vocab_size, (prefix_len,), generator=gen).tolist()
    in_lens = uniform_lengths(sizes["input_len"], sizes["range_ratio"], count, gen, 0 if prefix_len else 1)
    out_lens = uniform_lengths(sizes["output_len"], sizes["range_ratio"], count, gen, 1)
    prompts = [prefix + torch.randint(0, vocab_size, (k,), generator=gen).tolist() for k in in_lens]
    return Workload(prompts, out_lens, n, prefix_len)


def check_fits(w: Workload, n_positions: int, what: str) -> None:
    longest = max(len(p) + o for p, o in zip(w.prompts, w.output_lens))
    if longest > n_positions:
        raise SystemExit(f"{what}: a request needs {longest} positions (prompt + output), the model has {n_positions}")


# ---------------------------------------------------------------------------------------------------- models
def write_random_checkpoint(model: str, seed: int, directory: Path) -> Path:
    """transformers' GPT-2 for ``model`` (a preset, or a directory's config.json) with random weights, saved as the
    checkpoint both sides load."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config.from_pretrained(model) if os.path.isdir(model) else GPT2Config(**PRESETS[model.split("/")[-1]])
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def load_hf(checkpoint: Path, dtype: str, device: str):
    """transformers' GPT-2 from the checkpoint ours loads, in eval mode (SDPA attention for ``generate``)."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(checkpoint), dtype=getattr(torch, dtype)).eval().to(device)


def make_llm(checkpoint: Path, args, enable_prefix_caching: bool) -> LLM:
    return LLM(str(checkpoint), backend=args.backend, dtype=args.dtype, device=args.device, progress=False,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               block_size=args.block_size, num_blocks=args.num_blocks,
               enable_prefix_caching=enable_prefix_caching, speculative_config=args.speculative_config)  # fmt: skip


def random_draft(args, directory: Path) -> None:
    """With random weights, a draft model named by a preset gets random weights of its own (seed + 1): the
    speculative config then names that checkpoint."""
    draft = (args.speculative_config or {}).get("model")
    if args.load_format == "dummy" and draft is not None and not os.path.isdir(draft):
        log(f"writing the draft {draft} with random weights (seed {args.seed + 1}) as a checkpoint")
        args.speculative_config["model"] = str(write_random_checkpoint(draft, args.seed + 1, directory))


# ---------------------------------------------------------------------------------------------------- systems
# Each system completes a workload and returns its completions: outputs[i] holds prompt i's n token lists.
Outputs = list[list[list[int]]]


def run_ours(llm: LLM, w: Workload, seed: int) -> Outputs:
    """All requests in one ``LLM.generate`` call (the engine schedules them: continuous batching)."""
    temperature = 1.0 if w.sampling else 0.0
    params = [SamplingParams(n=w.n, max_tokens=o, temperature=temperature, ignore_eos=True,
                             seed=seed + i if w.sampling else None)
              for i, o in enumerate(w.output_lens)]  # fmt: skip
    outs = llm.generate(w.prompts, params, use_tqdm=False)
    return [[c.token_ids for c in sorted(out.outputs, key=lambda c: c.index)] for out in outs]


def sampling_kwargs(w: Workload) -> dict:
    return dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if w.sampling else dict(do_sample=False)


def hf_generate_order(w: Workload, sort: bool) -> list[int]:
    """The order padded batches are cut in: by prompt + output length when sorting (less padding), else as given."""
    order = list(range(len(w.prompts)))
    return sorted(order, key=lambda i: (len(w.prompts[i]) + w.output_lens[i], i)) if sort else order


def run_hf_generate(hf, w: Workload, batch_size: int, sort: bool) -> Outputs:
    """transformers ``generate`` on padded batches: left padding, attention mask, every row generating the batch's
    longest output (``min_new_tokens`` = ``max_new_tokens``); each request keeps its own first ``output_len``."""
    outputs: Outputs = [[] for _ in w.prompts]
    order = hf_generate_order(w, sort)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(w.prompts[i]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, width - len(w.prompts[i]) :] = torch.tensor(w.prompts[i])
            mask[row, width - len(w.prompts[i]) :] = 1
        new = max(w.output_lens[i] for i in batch)
        with torch.inference_mode():
            out = hf.generate(ids.to(hf.device), attention_mask=mask.to(hf.device), max_new_tokens=new,
                              min_new_tokens=new, num_return_sequences=w.n, eos_token_id=None, pad_token_id=0,
                              **sampling_kwargs(w))  # fmt: skip
        gen = out[:, width:].tolist()
        for row, i in enumerate(batch):
            outputs[i] = [gen[row * w.n + j][: w.output_lens[i]] for j in range(w.n)]
    return outputs


def run_hf_continuous(hf, w: Workload, args, max_batch_tokens: int) -> Outputs:
    """transformers' continuous batching, the manager ``generate_batch`` runs, with paged attention.

    ``generate_batch`` gives every request the same ``max_new_tokens``; its manager's ``add_request`` takes one per
    request, so we drive the manager as ``generate_batch`` does (same start, wait and stop) with each request's own
    length. ``num_return_sequences`` forks n - 1 children after the prompt (sampling only: transformers refuses
    greedy with n > 1); a child's id is ``<id>__child#<k>``.
    """
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    page = args.cb_page_size
    num_blocks = sum(-(-(len(p) + o) // page) for p, o in zip(w.prompts, w.output_lens)) * w.n + 1  # all fit
    gen_config = GenerationConfig(max_new_tokens=max(w.output_lens), eos_token_id=-1, pad_token_id=0,
                                  num_return_sequences=w.n, **sampling_kwargs(w))  # fmt: skip
    cb_config = ContinuousBatchingConfig(page_size=page, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                                         max_requests_per_batch=args.max_num_seqs, seed=args.seed)  # fmt: skip
    hints = WorkloadHints(max_prompt_length=max(map(len, w.prompts)), max_generated_length=max(w.output_lens),
                          num_requests=len(w.prompts) * w.n)  # fmt: skip
    previous = hf.config._attn_implementation
    hf.set_attn_implementation(args.cb_attn)
    try:
        with (
            torch.inference_mode(),
            hf.continuous_batching_context_manager(
                generation_config=gen_config, continuous_batching_config=cb_config, workload_hints=hints, block=True
            ) as manager,
        ):
            ids = {}
            for i, (prompt, o) in enumerate(zip(w.prompts, w.output_lens)):
                ids[f"r{i}"] = (i, 0)
                ids.update({f"r{i}__child#{k}": (i, k + 1) for k in range(w.n - 1)})
                manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=o)
            outputs: Outputs = [[None] * w.n for _ in w.prompts]
            remaining = len(ids)
            while remaining:
                result = manager.get_result(timeout=1)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError(f"transformers' continuous batching stopped with {remaining} requests left")
                    continue
                if not result.is_finished():
                    continue
                if result.error is not None:
                    raise RuntimeError(
                        f"transformers' continuous batching: request {result.request_id}: {result.error}"
                    )
                i, k = ids[result.request_id]
                outputs[i][k] = list(result.generated_tokens)
                remaining -= 1
    finally:
        hf.set_attn_implementation(previous)
    return outputs


def hf_reference(hf, prompts: list[list[int]], lens: list[int]) -> list[list[int]]:
    """Greedy tokens from transformers' ``generate``, one unpadded prompt at a time: what every system must match."""
    refs = []
    for prompt, n in zip(prompts, lens):
        x = torch.tensor([prompt], device=hf.device)
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        refs.append(out[0, len(prompt) :].tolist())
    return refs


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Result:
    """One system on one scenario: wall time of the whole workload and what it computed."""

    scenario: str
    system: str
    label: str
    details: str  # how it was configured
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    validated: bool | None  # greedy tokens matched transformers' before timing (None: not checked)
    full_length: bool  # every completion generated exactly its output length
    cpu_s: float  # CPU time of the process (all its threads) over the run
    agree_with_ours: float | None = None  # greedy runs: fraction of completions token-identical to ours
    prompt_tokens_computed: int | None = None  # ours: prompt tokens minus prefix-cache hits
    prefix_cache_hits: int | None = None
    num_preemptions: int | None = None
    spec_decode_acceptance_rate: float | None = None  # ours speculating: drafts accepted / drafts fed
    notes: list[str] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    def as_dict(self) -> dict:
        return {**asdict(self), "requests_per_s": self.requests_per_s, "total_tokens_per_s": self.total_tokens_per_s,
                "output_tokens_per_s": self.output_tokens_per_s}  # fmt: skip


def timed(fn: Callable, *args):
    """``(wall seconds, CPU seconds of this process, fn(*args))``, after a garbage collection so a previous
    system's garbage is not billed here. On a busy machine CPU time is the steadier of the two."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    value = fn(*args)
    return time.perf_counter() - start, time.process_time() - cpu, value


def full_length(w: Workload, outputs: Outputs) -> bool:
    """Every prompt got n completions, each exactly its output length (EOS never ended one early)."""
    counts_ok = all(len(cs) == w.n for cs in outputs)
    return counts_ok and all(len(c) == o for cs, o in zip(outputs, w.output_lens) for c in cs)


def agreement(a: Outputs, b: Outputs) -> float:
    pairs = [(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return sum(x == y for x, y in pairs) / len(pairs)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- scenarios
@dataclass
class Systems:
    """What runs: our engine with and without prefix caching, transformers' model, and the peers chosen."""

    hf: object
    ours: LLM
    ours_no_cache: LLM | None
    peers: list[str]
    args: argparse.Namespace

    def runners(self, scenario: str) -> list[tuple[str, str, str, Callable[[Workload], Outputs]]]:
        """(system, label, details, run) in the order they are timed: ours first, the peers compare against it."""
        a = self.args
        ours = (
            f"backend {self.ours.backend}, max_num_seqs {a.max_num_seqs}, {self.ours.max_num_batched_tokens} tok/step"
        )
        systems = [("ours", "ours" + (", prefix caching on" if scenario == "prefix" else ""), ours,
                    lambda w: run_ours(self.ours, w, a.seed))]  # fmt: skip
        if scenario == "prefix" and self.ours_no_cache is not None:
            systems.append(("ours_no_prefix_caching", "ours, prefix caching off", ours,
                            lambda w: run_ours(self.ours_no_cache, w, a.seed)))  # fmt: skip
        if "generate" in self.peers:
            order = "sorted by prompt + output length" if a.hf_sort else "in request order"
            systems.append(("generate", "transformers generate", f"padded batches of {a.hf_batch_size}, {order}",
                            lambda w: run_hf_generate(self.hf, w, a.hf_batch_size, a.hf_sort)))  # fmt: skip
        if "generate_batch" in self.peers:
            tokens = a.cb_max_batch_tokens or self.ours.max_num_batched_tokens
            details = (f"its continuous-batching manager, per-request max_new_tokens, {a.cb_attn}, page "
                       f"{a.cb_page_size}, {tokens} tok/step")  # fmt: skip
            systems.append(("generate_batch", "transformers generate_batch", details,
                            lambda w: run_hf_continuous(self.hf, w, a, tokens)))  # fmt: skip
        return systems


# How far below transformers' greedy pick another token's logit may be, relative to the row's largest |logit|, for a
# system to pick it instead: a tie that rounding in this dtype breaks either way (transformers' own padded batches
# break some in bf16). fp32's is tight enough that a wrong model does not pass as ties.
NEAR_TIE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}


def logit_gap(hf, prompt: list[int], ref: list[int], i: int, token: int) -> float:
    """How far ``token``'s logit lies below that of transformers' pick ``ref[i]`` after ``prompt + ref[:i]``, relative
    to the row's largest |logit|."""
    x = torch.tensor([prompt + ref[:i]], device=hf.device)
    with torch.inference_mode():
        logits = hf(x).logits[0, -1].float()
    return ((logits[ref[i]] - logits[token]) / logits.abs().max()).item()


def matches_greedy(hf, prompt: list[int], ref: list[int], got: list[int], dtype: str) -> tuple[bool, str]:
    """Whether ``got`` is transformers' greedy completion ``ref``, or leaves it at a near-tie (:data:`NEAR_TIE`) and
    is not compared past that (another continuation); and what happened, in words."""
    i = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    if i is None:
        return (True, "equal") if len(got) == len(ref) else (False, f"{len(got)} tokens instead of {len(ref)}")
    gap = logit_gap(hf, prompt, ref, i, got[i])
    return gap <= NEAR_TIE[dtype], f"token {i} differs, {gap:.1e} of the largest |logit| below transformers' pick"


def validate(
    system: str, run: Callable[[Workload], Outputs], v: Workload, refs: list[list[int]], hf, dtype: str
) -> bool:
    """Greedy completions of the validation requests equal transformers' unpadded ``generate``, or leave it only at
    a near-tie.

    Ours runs them one at a time so that, with a shared prefix, the second one hits the prefix cache."""
    if system.startswith("ours"):
        got = [run(Workload([p], [o], 1, v.prefix_len))[0] for p, o in zip(v.prompts, v.output_lens)]
    else:
        got = run(v)
    checks = [matches_greedy(hf, p, r, g[0], dtype) for p, r, g in zip(v.prompts, refs, got)]
    for n, (ok, what) in enumerate(checks):
        if what != "equal":
            log(f"  {system}: validation prompt {n}: {what}: {'a near-tie' if ok else 'INVALID'}")
    return all(ok for ok, _ in checks)


def workloads(name: str, args, vocab_size: int, n_positions: int) -> tuple[Workload, Workload]:
    """The scenario's timed workload, and two fresh greedy requests of its shape to validate on (their own prefix,
    so ours' prefix cache holds nothing of the timed workload)."""
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SCENARIOS[name].items()}
    w = make_workload(sizes, args.n, vocab_size, args.seed)
    v = make_workload({**sizes, "num_prompts": 2}, 1, vocab_size, args.seed + 1)
    v.output_lens = [min(o, args.validate_tokens) for o in v.output_lens]
    check_fits(w, n_positions, f"scenario {name}")
    return w, v


def run_scenario(name: str, w: Workload, v: Workload, systems: Systems) -> dict:
    refs = hf_reference(systems.hf, v.prompts, v.output_lens)
    info = w.describe()
    log(f"[{name}] {info['num_prompts']} prompts, {info['prompt_tokens']} prompt + {info['output_tokens']} output "
        f"tokens, n={w.n} ({info['sampling']})")  # fmt: skip
    results: list[Result] = []
    ours_outputs = None
    for system, label, details, run in systems.runners(name):
        llm = {"ours": systems.ours, "ours_no_prefix_caching": systems.ours_no_cache}.get(system)
        log(f"[{name}] {label}: validating")
        valid = validate(system, run, v, refs, systems.hf, systems.args.dtype)
        before = llm.llm_engine.get_stats() if llm is not None else None
        log(f"[{name}] {label}: running {len(w.prompts)} requests")
        elapsed, cpu_s, outputs = timed(run, w)
        r = Result(name, system, label, details, elapsed, len(w.prompts), w.prompt_tokens, w.output_tokens, valid,
                   full_length(w, outputs), cpu_s)  # fmt: skip
        if llm is not None:
            after = llm.llm_engine.get_stats()
            r.prefix_cache_hits = after.prefix_cache_hits - before.prefix_cache_hits
            r.prompt_tokens_computed = (after.prompt_tokens - before.prompt_tokens) - r.prefix_cache_hits
            r.num_preemptions = after.num_preemptions - before.num_preemptions
            fed = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
            if fed:
                r.spec_decode_acceptance_rate = (
                    after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
                ) / fed
        if system == "ours":
            ours_outputs = outputs
        elif ours_outputs is not None and not w.sampling:
            r.agree_with_ours = agreement(outputs, ours_outputs)
        if system == "generate_batch" and w.n > 1:
            r.notes.append("num_return_sequences: n - 1 children forked after the prompt, sharing its blocks")
        if not r.full_length:
            r.notes.append("some completion did not generate exactly its output length")
        log(f"[{name}] {label}: {elapsed:.1f} s ({cpu_s:.1f} s CPU), {r.output_tokens_per_s:.1f} output tok/s")
        results.append(r)
    return dict(workload=info, results=results, ratios=ratios(results))


def ratios(results: list[Result]) -> dict[str, float]:
    """ours / peer throughput (the same for requests, total and output tokens: the work is the same), and the
    prefix-caching comparison."""
    by = {r.system: r for r in results}
    out = {}
    if "ours" in by:
        for r in results:
            if r.system not in ("ours", "ours_no_prefix_caching"):
                out[f"ours/{r.system}"] = r.elapsed_s / by["ours"].elapsed_s
    if "ours" in by and "ours_no_prefix_caching" in by:
        on, off = by["ours"], by["ours_no_prefix_caching"]
        out["prompt_tokens_computed_off/on"] = off.prompt_tokens_computed / max(on.prompt_tokens_computed, 1)
        out["prefix_caching_speedup"] = off.elapsed_s / on.elapsed_s
    return out


# ---------------------------------------------------------------------------------------------------- reporting
def machine_info(args) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())  # fmt: skip
    except OSError:
        commit, dirty = "", False
    import transformers

    return dict(
        cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        device=args.device, gpu=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"), git_commit=commit, git_dirty=dirty,
    )  # fmt: skip


def print_scenario(name: str, s: dict) -> None:
    info = s["workload"]
    pre = f"{info['prefix_len']}-token shared prefix + " if info["prefix_len"] else ""
    print(f"\n[{name}] {info['num_prompts']} prompts: {pre}{info['input_len_min']}-{info['input_len_max']} random "
          f"tokens (mean {info['input_len_mean']:.1f}), output {info['output_len_min']}-{info['output_len_max']} "
          f"(mean {info['output_len_mean']:.1f}), n={info['n']}, {info['sampling']}: {info['prompt_tokens']} prompt + "
          f"{info['output_tokens']} output tokens")  # fmt: skip
    width = max(len(r.label) for r in s["results"])
    print(f"  {'system':<{width}} {'time s':>7} {'cpu s':>7} {'req/s':>6} {'total tok/s':>11} {'out tok/s':>9} "
          f"{'ours/peer':>9}  check")  # fmt: skip
    base = next((r for r in s["results"] if r.system == "ours"), None)
    for r in s["results"]:
        ratio = f"{r.elapsed_s / base.elapsed_s:.2f}x" if base is not None and r is not base else "-"
        check = {True: "valid", False: "INVALID", None: "unchecked"}[r.validated]
        if not r.full_length:
            check += ", WRONG LENGTHS"
        if r.agree_with_ours is not None:
            check += f", {r.agree_with_ours:.0%} same tokens as ours"
        if r.prompt_tokens_computed is not None:
            check += f", {r.prompt_tokens_computed} prompt tokens computed"
        if r.num_preemptions:
            check += f", {r.num_preemptions} preemptions"
        if r.spec_decode_acceptance_rate is not None:
            check += f", {r.spec_decode_acceptance_rate:.0%} of drafts accepted"
        print(f"  {r.label:<{width}} {r.elapsed_s:>7.2f} {r.cpu_s:>7.2f} {r.requests_per_s:>6.2f} "
              f"{r.total_tokens_per_s:>11.1f} {r.output_tokens_per_s:>9.1f} {ratio:>9}  {check}")  # fmt: skip
    for r in s["results"]:
        if r.system != "ours_no_prefix_caching":
            print(f"  {r.label}: {r.details}")
    for key, value in s["ratios"].items():
        print(f"  {key}: {value:.2f}x")


def goals(scenarios: dict) -> list[dict]:
    rows = []
    for scenario, label, key, target in GOALS:
        value = scenarios.get(scenario, {}).get("ratios", {}).get(key)
        status = "SKIP" if value is None else ("PASS" if value >= target else "MISS")
        rows.append(dict(scenario=scenario, goal=f"{label} >= {target:g}x", ratio=value, status=status))
    return rows


def default_json_path(machine: dict) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", machine["gpu"] or machine["cpu"]).strip("-").lower()
    return RESULTS / f"throughput_{slug}_{_dt.datetime.now():%Y%m%d-%H%M%S}.json"


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", help="a preset (gpt2, gpt2-medium, ...) or a checkpoint directory")
    ap.add_argument("--load-format", choices=["auto", "dummy"], default=None,
                    help="dummy: random weights (default for a preset); auto: the checkpoint's weights (default for a "
                    "directory)")  # fmt: skip
    ap.add_argument("--scenario", choices=["random", "prefix", "all"], default="all")
    ap.add_argument("--num-prompts", type=int, help="default: random 32, prefix 16")
    ap.add_argument("--input-len", type=int, help="mean random tokens after the prefix; default 64")
    ap.add_argument("--output-len", type=int, help="mean output tokens; default: random 48, prefix 16")
    ap.add_argument("--range-ratio", type=float, help="lengths uniform in len*(1-r)..len*(1+r); default 0.5")
    ap.add_argument("--prefix-len", type=int, help="shared random prefix; default random 0, prefix 512")
    ap.add_argument("--n", type=int, default=1, help="completions per prompt (n > 1 samples at temperature 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=sorted(NEAR_TIE))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, help="ours' per-step token budget (default: the engine's)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, help="ours' KV pool in blocks (default: the engine's)")
    add_speculative_arg(ap)  # ours speculates (a draft preset gets random weights too with dummy weights)
    ap.add_argument(
        "--peers",
        nargs="*",
        choices=PEERS,
        default=None,
        help="peers to run (default: both in the random scenario, none in prefix; no value: none)",
    )
    ap.add_argument("--hf-batch-size", type=int, default=16, help="padded generate's batch size")
    ap.add_argument("--hf-sort", action=argparse.BooleanOptionalAction, default=False,
                    help="cut padded batches from requests sorted by prompt + output length (default: in request "
                    "order, as vLLM's benchmark_throughput runs transformers)")  # fmt: skip
    ap.add_argument("--cb-attn", default="paged|eager", help="continuous batching's attention implementation")
    ap.add_argument("--cb-page-size", type=int, default=256, help="continuous batching's page size (its default)")
    ap.add_argument("--cb-max-batch-tokens", type=int, help="continuous batching's per-step tokens (default: ours')")
    ap.add_argument("--validate-tokens", type=int, default=16, help="greedy tokens compared before timing")
    ap.add_argument("--output-json", help="default: bench/results/throughput_<cpu>_<date>.json")
    args = ap.parse_args(argv)
    if args.load_format is None:
        args.load_format = "auto" if os.path.isdir(args.model) else "dummy"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["random", "prefix"] if args.scenario == "all" else [args.scenario]
    machine = machine_info(args)
    print(f"gpt2-triton throughput: {args.model} ({args.load_format} weights) {args.dtype} on {args.device}, "
          f"threads={torch.get_num_threads()}; {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']}, "
          f"transformers {machine['transformers']}; {machine['date']}, commit {machine['git_commit'][:10]}"
          f"{' (dirty)' if machine['git_dirty'] else ''}"
          f"{f'; ours speculating: {args.speculative_config}' if args.speculative_config else ''}")  # fmt: skip
    scenarios = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.load_format == "dummy":
            log(f"writing {args.model} with random weights (seed {args.seed}) as a checkpoint")
            checkpoint = write_random_checkpoint(args.model, args.seed, Path(tmp))
        else:
            checkpoint = Path(args.model)
        random_draft(args, Path(tmp) / "draft")
        hf = load_hf(checkpoint, args.dtype, args.device)
        todo = {name: workloads(name, args, hf.config.vocab_size, hf.config.n_positions) for name in names}
        for name, (w, v) in todo.items():
            # a fresh engine per scenario: its prefix cache starts empty
            log(f"[{name}] loading ours")
            ours = make_llm(checkpoint, args, enable_prefix_caching=True)
            ours_no_cache = make_llm(checkpoint, args, enable_prefix_caching=False) if name == "prefix" else None
            peers = args.peers if args.peers is not None else (list(PEERS) if name == "random" else [])
            systems = Systems(hf, ours, ours_no_cache, peers, args)
            scenarios[name] = run_scenario(name, w, v, systems)
            print_scenario(name, scenarios[name])
            del systems, ours, ours_no_cache
    goal_rows = goals(scenarios)
    print(f"\ngoals (set for gpt2, random weights, fp32, CPU; this run: {args.model}, {args.dtype}, {args.device}):")
    for g in goal_rows:
        value = "-" if g["ratio"] is None else f"{g['ratio']:.2f}x"
        print(f"  {g['status']:<4}  {g['scenario']}: {g['goal']}: {value}")
    machine["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = dict(
        machine=machine, args=vars(args),
        scenarios={k: {**s, "results": [r.as_dict() for r in s["results"]]} for k, s in scenarios.items()},
        goals=goal_rows,
        notes=["ours/peer is the ratio of wall times: requests/s, total and output tokens/s all scale by it",
               "output tokens count each completion's own output length; padded generate computes more and drops it",
               "generate_batch is driven through its manager (add_request) so each request has its own max_new_tokens"],
    )  # fmt: skip
    path = Path(args.output_json) if args.output_json else default_json_path(machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
