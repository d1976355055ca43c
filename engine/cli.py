"""Command line: ``gpt2-triton generate|score|check-kernels`` (also ``python -m engine ...``).

User errors print one line on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user asked for (bad flag, unreadable file, ...)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error; we want one line
        raise UsageError(f"{self.prog}: {message}")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt2-medium", help="checkpoint directory or hub id (default: gpt2-medium)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: random weights")
    p.add_argument("--quantization", default=None, choices=["int8", "int4"])
    p.add_argument("--tokenizer", default=None, help="directory with vocab.json + merges.txt, or a .tiktoken file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


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
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--n", type=int, default=1, help="completions to sample")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated (n=1)")

    score = sub.add_parser("score", help="perplexity of a text file")
    score.add_argument("file")
    _model_args(score)
    score.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: half the context)")
    score.add_argument("--json", action="store_true", help="print a JSON object instead of a line")

    sub.add_parser("check-kernels", help="compile every kernel ahead of time for sm_80/sm_90", add_help=False)
    return parser


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
        max_num_seqs=max(getattr(args, "n", 1), 1),
    )


def _generate(args) -> int:
    from engine import SamplingParams

    if args.stream and args.n != 1:
        raise UsageError("--stream prints one completion: use it with --n 1")
    params = SamplingParams(
        n=args.n,
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    llm = _make_llm(args)
    if args.stream:
        sys.stdout.write(args.prompt)
        for delta in llm.generate_stream(args.prompt, params):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    out = llm.generate(args.prompt, params, use_tqdm=not args.quiet)[0]
    for c in out.outputs:
        if args.n > 1:
            print(f"--- completion {c.index} ({c.finish_reason}) ---")
        print(args.prompt + c.text)
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
    result = llm.score(text, stride=args.stride)[0]
    n = len(result.token_ids)
    if args.json:
        print(json.dumps({"file": args.file, "tokens": n, "perplexity": result.perplexity,
                          "nll": -sum(result.logprobs) / len(result.logprobs)}))  # fmt: skip
    else:
        print(f"{args.file}: perplexity {result.perplexity:.4f} over {n} tokens")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "check-kernels":
            from kernels.compile_gate import main as gate

            return gate(argv[1:])
        args = build_parser().parse_args(argv)
        return _generate(args) if args.command == "generate" else _score(args)
    except (UsageError, ValueError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(message if isinstance(e, UsageError) else f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
