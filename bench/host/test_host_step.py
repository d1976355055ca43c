"""Host time of one decode step of the engine, the forward pass stubbed (see ``bench/host/stub.py``): scheduling,
building the step's tensors, sampling, detokenizing and making the outputs, for 1, 64 and 256 running sequences;
then each of those parts alone at 256. Goal: the whole step at 256 sequences under 2 ms on this CPU.
"""

from __future__ import annotations

import pytest

from bench.host.stub import decoding_engine, write_model_dir

ROUNDS = {1: 300, 64: 100, 256: 50}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    return write_model_dir(tmp_path_factory.mktemp("stub-model"), tokenizer_dir)


@pytest.fixture(scope="module")
def prompts(text) -> list[str]:
    """256 prompts of 24 words (~30 tokens) from real text."""
    words = text.split()
    return [" ".join(words[(37 * i) % (len(words) - 24) :][:24]) for i in range(256)]


def check_step(engine, batch: int, output: str) -> None:
    """Validate before timing: a step gives each running sequence one token; a stream's request gets an output
    with that token and its text, a final-only request none until it finishes."""
    before = {seq.seq_id: len(seq.output_token_ids) for seq in engine.scheduler.running}
    outputs = engine.step()
    assert len(before) == batch
    assert all(len(seq.output_token_ids) == before[seq.seq_id] + 1 for seq in engine.scheduler.running)
    if output == "final":
        assert outputs == []
    else:
        assert len(outputs) == batch
        assert all(len(out.outputs[0].token_ids) == 1 for out in outputs)
        assert "".join(out.outputs[0].text for out in outputs)  # detokenized (one token may hold half a character)


@pytest.mark.benchmark(group="step: host time of a decode step (stub forward)")
@pytest.mark.parametrize("output", ["final", "stream"])
@pytest.mark.parametrize("kind", ["greedy", "sampled"])
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_decode_step(benchmark, model_dir, prompts, batch, kind, output):
    """``final``: ``LLM.generate`` (one output per request, at its end); ``stream``: a server streaming each token."""
    engine = decoding_engine(model_dir, prompts[:batch], kind, output)
    check_step(engine, batch, output)
    benchmark.pedantic(engine.step, rounds=ROUNDS[batch], warmup_rounds=3)


@pytest.mark.benchmark(group="step: host time of a decode step (stub forward)")
def test_decode_step_lora(benchmark, model_dir, prompts, tmp_path_factory):
    """256 sequences under four LoRA adapters and the base model, streamed: what the adapters' bookkeeping (each
    row's slot, the slots' check, the stats' adapter names) adds to ``test_decode_step[256-sampled-stream]``."""
    from bench.host.stub import write_lora_dirs

    loras = write_lora_dirs(tmp_path_factory.mktemp("loras"), 4)
    engine = decoding_engine(model_dir, prompts, "sampled", "stream", loras=loras)
    check_step(engine, 256, "stream")
    assert engine.get_stats().running_lora_adapters == tuple(lora.lora_name for lora in loras)
    benchmark.pedantic(engine.step, rounds=ROUNDS[256], warmup_rounds=3)


@pytest.mark.benchmark(group="step: the full vocabulary's math on this CPU (a CPU deployment)")
@pytest.mark.parametrize("kind", ["greedy", "sampled"])
def test_decode_step_full_vocab_cpu(benchmark, model_dir, prompts, kind):
    """The same step with 50257 logits per row: sampling's math over [256, 50257] on the CPU, for reference."""
    engine = decoding_engine(model_dir, prompts, kind, "final", vocab=50257)
    check_step(engine, 256, "final")
    benchmark.pedantic(engine.step, rounds=5, warmup_rounds=1)


@pytest.fixture
def engine_256(model_dir, prompts):
    engine = decoding_engine(model_dir, prompts, "sampled")
    check_step(engine, 256, "stream")
    return engine


@pytest.mark.benchmark(group="step parts at 256 sequences (sampled)")
def test_part_schedule(benchmark, engine_256):
    """The scheduler's decision (blocks reserved for each sequence's next token): repeatable until the step runs."""
    out = engine_256.scheduler.schedule()
    assert len(out.seqs) == 256 and out.num_tokens == [1] * 256
    benchmark.pedantic(engine_256.scheduler.schedule, rounds=50, warmup_rounds=2)


@pytest.mark.benchmark(group="step parts at 256 sequences (sampled)")
def test_part_build_tensors(benchmark, engine_256):
    """The runner: slots, positions, block tables and ids to tensors, then the (stub) forward."""
    step = engine_256.scheduler.schedule()
    seqs, logits = engine_256.runner.execute(step)
    assert len(seqs) == 256 and logits.shape[0] == 256
    benchmark.pedantic(engine_256.runner.execute, args=(step,), rounds=50, warmup_rounds=2)


@pytest.mark.benchmark(group="step parts at 256 sequences (sampled)")
def test_part_sample(benchmark, engine_256):
    """The sampler and the chosen tokens' log-probs, as ``LLMEngine._sample`` calls them (the batch's sampling
    parameters read once, as for the same sequences step after step)."""
    from engine.sampling import token_logprobs

    seqs = list(engine_256.scheduler.running)
    logits = engine_256.runner.model.table[: len(seqs)]  # what the stub forward returns

    def sample():
        batch = engine_256._sampling_batch(seqs, logits.shape[-1])
        tokens, logprobs = engine_256.sampler.sample(logits, batch, seqs)
        return token_logprobs(logprobs, tokens, batch.num_top)

    chosen, _ = sample()
    assert len(chosen) == 256
    benchmark.pedantic(sample, rounds=50, warmup_rounds=2)


@pytest.mark.benchmark(group="step parts at 256 sequences (sampled)")
def test_part_detokenize_and_outputs(benchmark, engine_256):
    """Each new token through the output processor (detokenizing, stop checks), then the step's RequestOutputs."""
    seqs = list(engine_256.scheduler.running)
    tokens = [seq.output_token_ids[-1] for seq in seqs]

    def outputs():
        for seq, token in zip(seqs, tokens):
            engine_256.output_processor.append_token(seq, token, -1.0, None)
        return engine_256._outputs(seqs)

    assert len(outputs()) == 256
    benchmark.pedantic(outputs, rounds=50, warmup_rounds=2)


@pytest.mark.benchmark(group="speculation: a step's n-gram lookups, 256 sequences")
@pytest.mark.parametrize("context", [100, 1000])
def test_ngram_lookups(benchmark, text, tokenizer_dir, context):
    """What ``speculative_config`` adds to a decode step's host time: each of 256 decoding sequences looks its last
    1-4 tokens up in its ``context`` tokens of history (windows of real text: this README's repeats), kept as the
    proposer keeps them (4-byte words, appended as tokens come)."""
    from array import array

    from engine.speculative import lookup_drafts
    from engine.tokenizer import load_tokenizer

    ids = load_tokenizer(tokenizer_dir).encode(text)
    histories = [array("I", ids[(97 * i) % (len(ids) - context) :][:context]).tobytes() for i in range(256)]

    def lookups():
        return [lookup_drafts(words, 4, 4, 1) for words in histories]

    assert sum(map(bool, lookups())) > 64  # many windows of real text repeat their last token somewhere
    benchmark.pedantic(lookups, rounds=50, warmup_rounds=2)


@pytest.mark.benchmark(group="structured outputs: a step's mask, 64 sequences")
@pytest.mark.parametrize("kind", ["choice", "json"])
def test_structured_mask(benchmark, tokenizer_dir, kind):
    """What ``structured_outputs`` adds to a step's host time: 64 sequences' grammars write their allowed tokens'
    bits, unpacked once and applied to ``[64, 50257]`` logits (a choice: a handful of tokens allowed; a JSON
    schema inside a string: most of the vocabulary)."""
    import torch

    from engine.logits_processing import mask_disallowed
    from engine.structured_outputs import GrammarCompiler, StructuredOutputsParams
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    params = StructuredOutputsParams(choice=["yes", "no"]) if kind == "choice" else StructuredOutputsParams(json=schema)
    compiler = GrammarCompiler(tok)
    grammars = [compiler.grammar(params) for _ in range(64)]
    if kind == "json":
        for g in grammars:  # into the string: {"name": "
            for token in tok.encode('{"name":"'):
                g.advance(token)
    logits = torch.randn(64, 50257)
    allowed = grammars[0].allowed(50257).sum().item()
    assert (allowed < 20) if kind == "choice" else (allowed > 40000)
    fresh = lambda: ((logits.clone(), list(range(64)), grammars), {})  # noqa: E731 (untimed: a step's new logits)
    benchmark.pedantic(mask_disallowed, setup=fresh, rounds=30, warmup_rounds=2)
