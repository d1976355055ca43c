"""Command line: ``gpt2-triton generate|score|eval|serve|check-kernels`` (also ``python -m engine ...``).

User errors print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user asked for (bad flag, unreadable file, ...)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error; we want one line
        raise UsageError(f"{self.prog}: {message}")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt2-medium", help="checkpoint directory or hub id (default: gpt2-medium)")
    _backend_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    p.add_argument("--quantization", default=None, choices=["int8", "int4"])
    p.add_argument("--tokenizer", default=None, help="directory with vocab.json + merges.txt, or a .tiktoken file")


def _json_object(text: str) -> dict:
    """An argparse type: a JSON object (``--speculative-config '{"num_speculative_tokens": 4}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _lora_module(text: str) -> tuple[str, str]:
    """An argparse type: a served LoRA adapter, ``NAME=DIR`` or vLLM's ``{"name": NAME, "path": DIR}``."""
    if text.lstrip().startswith("{"):
        value = _json_object(text)
        name, path = value.get("name"), value.get("path")
    else:
        name, _, path = text.partition("=")
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        raise argparse.ArgumentTypeError(f'expected NAME=DIR or {{"name": NAME, "path": DIR}}, got {text!r}')
    return name, path


def add_speculative_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative-config", type=_json_object, default=None,
                   help='speculative decoding, as vLLM\'s: by n-gram lookup, \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\', or drafted by a smaller GPT-2, '
                        '\'{"model": "gpt2", "num_speculative_tokens": 4}\'')  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpt2-triton", description="GPT-2 inference with hand-written Triton kernels")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="continue a prompt")
    gen.add_argument("prompt")
    _model_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 = off (default 50, as GPT-2's generation config)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this times the top one's probability")
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--no-repeat-ngram-size", type=int, default=0, help="no n-gram of this size twice (0: off)")
    gen.add_argument("--n", type=int, default=1, help="completions to sample")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated (n=1)")
    add_speculative_arg(gen)
    gen.add_argument("--lora", default=None, metavar="DIR", help="generate with this PEFT LoRA adapter")
    structured = gen.add_argument_group(
        "structured outputs (pip install -e '.[structured]')"
    ).add_mutually_exclusive_group()
    structured.add_argument("--json-schema", default=None, help="a JSON schema file the completion must match")
    structured.add_argument("--json-object", action="store_true", help="the completion is a JSON object")
    structured.add_argument("--regex", default=None, help="a regular expression the completion must match")
    structured.add_argument("--choice", nargs="+", default=None, help="the completion is one of these")
    gen.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1: sample)")
    gen.add_argument("--length-penalty", type=float, default=1.0, help="beam score: logprob / length ** this")
    gen.add_argument("--early-stopping", default="false", choices=["false", "true", "never"],
                     help="when beam search stops (transformers' early_stopping)")  # fmt: skip

    score = sub.add_parser("score", help="perplexity of a text file")
    score.add_argument("file")
    _model_args(score)
    score.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: half the context)")
    score.add_argument("--json", action="store_true", help="print a JSON object instead of a line")
    score.add_argument("--lora", default=None, metavar="DIR", help="score under this PEFT LoRA adapter")

    _eval_parser(sub)
    _serve_parser(sub)
    _run_batch_parser(sub)
    sub.add_parser("check-kernels", help="compile every kernel ahead of time for sm_80/sm_90", add_help=False)
    return parser


def _eval_parser(sub) -> None:
    """``eval``: lm-evaluation-harness tasks through the gpt2-triton backend (the eval extra)."""
    p = sub.add_parser("eval", help="lm-evaluation-harness tasks, or the model card's zero-shot table")
    _model_args(p)
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks, groups or tags")
    p.add_argument("--paper-table", action="store_true", help="the GPT-2 model card's zero-shot table, ours beside it")
    p.add_argument("--paper-data", default=None, help="--paper-table: DIR/<column>.jsonl replace the Hub datasets")
    p.add_argument("--include-path", default=None, help="a directory of extra task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction of them if below 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per engine step (max_num_seqs)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's seeds (few-shot sampling, sampled generation)")
    p.add_argument("--lora", default=None, metavar="DIR", help="evaluate under this PEFT LoRA adapter")
    p.add_argument("--output", default=None, help="write the results as JSON to this file")


def _serve_parser(sub) -> None:
    """``serve``: vLLM's ``vllm serve`` flags, where they apply."""
    p = sub.add_parser("serve", help="serve the model behind an OpenAI-compatible HTTP API")
    p.add_argument("model", help="checkpoint directory or hub id (with --load-format dummy: a preset)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None, help="names clients use (default: the dir name)")
    p.add_argument("--api-key", default=None, help="require this bearer token on /v1 (or $GPT2_TRITON_API_KEY)")
    lora = _engine_flags(p)
    lora.add_argument("--allow-runtime-lora-updating", action="store_true",
                      help="POST /v1/load_lora_adapter, /v1/unload_lora_adapter (LoRA on; not on Ray)")  # fmt: skip
    p.add_argument("--max-waiting", type=int, default=512, help="requests queued before new ones get 503")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ray = p.add_argument_group("scale-out on Ray Serve (pip install -e '.[ray]')")
    ray.add_argument("--replicas", type=int, default=None, help="engine replicas behind one endpoint (local Ray)")
    ray.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. auto or HOST:6379)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many replicas")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=None, help="autoscaling target per replica")
    ray.add_argument("--replica-cpus", type=float, default=None, help="CPUs per replica (default: a fair share)")
    ray.add_argument("--replica-gpus", type=float, default=None, help="GPUs per replica (default: 1 if any)")


def _engine_flags(p: argparse.ArgumentParser):
    """The engine's flags that ``serve`` and ``run-batch`` share (vLLM's names); returns the LoRA group."""
    _backend_args(p)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV pool")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="the share of the GPU's memory the engine may fill (weights, a step's activations, the KV "
                        "pool; default: the pool takes half the memory free after loading)")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output served (<= the context)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    add_speculative_arg(p)
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="priority: requests' priority field orders the queue and picks who is preempted")  # fmt: skip
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file: enables /v1/chat/completions")
    lora = p.add_argument_group("LoRA adapters, each served as a model of its own name")
    lora.add_argument("--lora-modules", nargs="+", type=_lora_module, default=None, metavar="NAME=DIR",
                      help='PEFT adapters: NAME=DIR or \'{"name": NAME, "path": DIR}\' (turns LoRA on)')  # fmt: skip
    lora.add_argument("--max-loras", type=int, default=1, help="adapters in one step (device slots)")
    lora.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank served")
    lora.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept in host memory")
    return lora


def _engine_args(args, enable_lora: bool) -> dict:
    """``LLMEngine``'s arguments from :func:`_engine_flags`' (and the model's)."""
    return dict(
        model=args.model, backend=args.backend, dtype=args.dtype, device=args.device, load_format=args.load_format,
        quantization=args.quantization, tokenizer=args.tokenizer, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size, num_blocks=args.num_blocks,
        kv_cache_memory=args.kv_cache_memory, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager, speculative_config=args.speculative_config,
        scheduling_policy=args.scheduling_policy, progress=False, enable_lora=enable_lora,
        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
    )  # fmt: skip


def _run_batch_parser(sub) -> None:
    """``run-batch``: vLLM's ``vllm run-batch`` (OpenAI's Batch API files, offline)."""
    p = sub.add_parser("run-batch", help="answer a file of OpenAI batch requests (JSONL) into another")
    p.add_argument("-i", "--input-file", required=True, help="the requests, one JSON object a line")
    p.add_argument("-o", "--output-file", required=True, help="where their answers go, in the same order")
    p.add_argument("--model", default="gpt2-medium", help="checkpoint directory or hub id (default: gpt2-medium)")
    p.add_argument("--served-model-name", nargs="+", default=None, help="names the requests use (default: the dir)")
    _engine_flags(p)
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in the engine at once "
                   "(default: 4 x --max-num-seqs)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _make_llm(args):
    from engine import LLM

    return LLM(
        args.model,
        backend=args.backend,
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        quantization=args.quantization,
        tokenizer=args.tokenizer,
        progress=not args.quiet,
        max_num_seqs=max(getattr(args, "n", 1), getattr(args, "num_beams", 1), 1),
        speculative_config=getattr(args, "speculative_config", None),
        **_lora_engine_args(getattr(args, "lora", None)),
    )


def _lora_engine_args(path: str | None) -> dict:
    """What ``generate --lora DIR`` asks of the engine: LoRA on, with room for the adapter's rank."""
    from engine.lora import adapter_rank

    return {} if path is None else {"enable_lora": True, "max_lora_rank": adapter_rank(path)}


def _lora_request(args):
    from engine import LoRARequest

    return None if args.lora is None else LoRARequest(os.path.basename(os.path.normpath(args.lora)), 1, args.lora)


def _checked(kind, flags: dict[str, str], **fields):
    """``kind(**fields)``; its ``ValueError`` (which names the field) becomes a usage error naming the flag."""
    try:
        return kind(**fields)
    except ValueError as e:
        field, _, rest = str(e).partition(" ")
        if field not in fields:
            raise
        flag = flags.get(field, f"--{field.replace('_', '-')}")
        raise UsageError(f"gpt2-triton generate: {flag} {rest}") from None


def _generate(args) -> int:
    from engine import SamplingParams

    if args.num_beams != 1:
        return _beam_search(args)
    if args.stream and args.n != 1:
        raise UsageError("--stream prints one completion: use it with --n 1")
    params = _checked(SamplingParams, {"max_tokens": "--max-new-tokens"}, n=args.n, max_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                      repetition_penalty=args.repetition_penalty, seed=args.seed,
                      no_repeat_ngram_size=args.no_repeat_ngram_size,
                      structured_outputs=_structured_outputs(args))  # fmt: skip
    llm = _make_llm(args)
    if args.stream:
        sys.stdout.write(args.prompt)
        for delta in llm.generate_stream(args.prompt, params, lora_request=_lora_request(args)):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    out = llm.generate(args.prompt, params, use_tqdm=not args.quiet, lora_request=_lora_request(args))[0]
    for c in out.outputs:
        if args.n > 1:
            print(f"--- completion {c.index} ({c.finish_reason}) ---")
        print(args.prompt + c.text)
    return 0


def _structured_outputs(args):
    """What ``--json-schema`` / ``--json-object`` / ``--regex`` / ``--choice`` ask for (None: free text)."""
    from engine import StructuredOutputsParams

    if args.json_schema is not None:
        try:
            with open(args.json_schema, encoding="utf-8") as f:
                schema = json.load(f)
        except OSError as e:
            raise UsageError(f"cannot read {args.json_schema}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"--json-schema: {args.json_schema} is not JSON ({e})") from None
        return StructuredOutputsParams(json=schema)
    if args.json_object:
        return StructuredOutputsParams(json_object=True)
    if args.regex is not None:
        return StructuredOutputsParams(regex=args.regex)
    if args.choice is not None:
        return StructuredOutputsParams(choice=args.choice)
    return None


def _beam_search(args) -> int:
    from engine import BeamSearchParams

    if args.stream or args.n != 1:
        raise UsageError("gpt2-triton generate: --num-beams prints its beams: use it without --stream and --n")
    if _structured_outputs(args) is not None:
        raise UsageError("gpt2-triton generate: --num-beams does not combine with structured outputs")
    early_stopping = {"false": False, "true": True, "never": "never"}[args.early_stopping]
    params = _checked(BeamSearchParams, {"beam_width": "--num-beams", "max_tokens": "--max-new-tokens"},
                      beam_width=args.num_beams, max_tokens=args.max_new_tokens,
                      length_penalty=args.length_penalty, early_stopping=early_stopping,
                      no_repeat_ngram_size=args.no_repeat_ngram_size)  # fmt: skip
    llm = _make_llm(args)
    out = llm.beam_search(args.prompt, params, use_tqdm=not args.quiet, lora_request=_lora_request(args))[0]
    for i, seq in enumerate(out.sequences):
        print(f"--- beam {i}: score {seq.score:.4f} ({seq.finish_reason}) ---")
        print(seq.text)
    return 0


def _score(args) -> int:
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {args.file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{args.file} is not UTF-8 text") from None
    llm = _make_llm(args)
    result = llm.score(text, stride=args.stride, lora_request=_lora_request(args))[0]
    n = len(result.token_ids)
    if args.json:
        print(json.dumps({"file": args.file, "tokens": n, "perplexity": result.perplexity,
                          "nll": -sum(result.logprobs) / len(result.logprobs)}))  # fmt: skip
    else:
        print(f"{args.file}: perplexity {result.perplexity:.4f} over {n} tokens")
    return 0


def _eval(args) -> int:
    try:
        import lm_eval  # noqa: F401

        from engine import eval_command
    except ImportError as e:
        raise UsageError(f"eval needs the eval extra ({e.name} is missing): pip install -e '.[eval]'") from None
    if args.paper_table == bool(args.tasks):
        raise UsageError("gpt2-triton eval: give --tasks or --paper-table (one of them)")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"gpt2-triton eval: --limit must be positive, got {args.limit}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"gpt2-triton eval: --batch-size must be positive, got {args.batch_size}")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    model_args = dict(pretrained=args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                      load_format=args.load_format, quantization=args.quantization, tokenizer=args.tokenizer,
                      max_num_batched_tokens=args.max_num_batched_tokens, progress=not args.quiet,
                      **({"lora_local_path": args.lora} if args.lora else {}))  # fmt: skip
    if args.paper_table:
        from engine import paper_table

        return paper_table.main(model_args, args.batch_size, limit, args.paper_data, args.output, not args.quiet)
    tasks = eval_command.load_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.include_path)
    results = eval_command.run(tasks, model_args, args.batch_size, limit, args.num_fewshot, args.seed)
    eval_command.print_tables(results)
    if args.output:
        eval_command.write_results(results, args.output)
    return 0


def _serve(args) -> int:
    try:
        from engine.server import ServeOptions, serve
    except ImportError as e:
        raise UsageError(f"serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'") from None
    options = ServeOptions(args.host, args.port, args.served_model_name, args.api_key, args.chat_template,
                           args.max_waiting, args.max_body_bytes, args.shutdown_grace, args.log_level,
                           args.lora_modules, args.allow_runtime_lora_updating)  # fmt: skip
    engine_args = _engine_args(args, enable_lora=bool(args.lora_modules) or args.allow_runtime_lora_updating)
    scale = _scale_options(args)
    if scale is None and args.ray_address is None:
        return serve(options, engine_args)
    if args.allow_runtime_lora_updating:  # each replica would load its own: requests would find it or not by chance
        raise UsageError("gpt2-triton serve: --allow-runtime-lora-updating does not combine with Ray Serve replicas")
    try:
        from engine.server.ray_serve import ScaleOptions, serve_on_ray
    except ImportError as e:
        raise UsageError(f"--replicas needs the ray extra ({e.name} is missing): pip install -e '.[ray]'") from None
    return serve_on_ray(options, engine_args, ScaleOptions(**(scale or {})), args.ray_address)


# ScaleOptions field <- serve flag, and the least value the flag takes
_SCALE_FLAGS = {"num_replicas": ("replicas", 1), "min_replicas": ("min_replicas", 1),
                "max_replicas": ("max_replicas", 1), "target_ongoing_requests": ("target_ongoing_requests", 1),
                "num_cpus": ("replica_cpus", 0), "num_gpus": ("replica_gpus", 0)}  # fmt: skip


def _scale_options(args) -> dict | None:
    """The Ray Serve scaling flags given, checked (None when none was)."""
    given = {}
    for name, (flag, least) in _SCALE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None and value < least:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
        if value is not None:
            given[name] = value
    if given.get("min_replicas", 1) > given.get("max_replicas", float("inf")):
        raise UsageError("--min-replicas is larger than --max-replicas")
    if "num_replicas" in given and ("min_replicas" in given or "max_replicas" in given):
        raise UsageError("--replicas is a fixed count: use it or --min-replicas/--max-replicas, not both")
    return given or None


def _run_batch(args) -> int:
    try:
        from engine.server import ServeOptions
        from engine.server.batch import main
    except ImportError as e:
        raise UsageError(f"run-batch needs the serve extra ({e.name} is missing): pip install -e '.[serve]'") from None
    concurrency = args.max_concurrency or 4 * args.max_num_seqs
    if concurrency < 1:
        raise UsageError(f"gpt2-triton run-batch: --max-concurrency must be positive, got {concurrency}")
    # every request comes from the file, already read: no queue limit or body size to protect
    options = ServeOptions(served_model_names=args.served_model_name, chat_template=args.chat_template,
                           max_waiting=1 << 30, max_body_bytes=1 << 40, lora_modules=args.lora_modules)  # fmt: skip
    engine_args = _engine_args(args, enable_lora=bool(args.lora_modules))
    return main(options, engine_args, args.input_file, args.output_file, concurrency, not args.quiet)


COMMANDS = {"generate": _generate, "score": _score, "eval": _eval, "serve": _serve, "run-batch": _run_batch}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "check-kernels":
            from kernels.compile_gate import main as gate

            return gate(argv[1:])
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except (UsageError, ValueError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(message if isinstance(e, UsageError) else f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
