"""bench/llama_cpp.py's pure parts: llama.cpp's outputs parsed, the converter's config, greedy matching, the table.

No llama.cpp build here: the tool outputs are captured samples (the shapes llama-bench, llama-batched-bench and
llama-tokenize print) with fresh random rates filled in.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from bench.llama_cpp import parse_args, run_llama
from bench.llamacpp import LlamaCppCrash, LlamaCppError
from bench.llamacpp import table as tbl
from bench.llamacpp.build import LlamaCpp
from bench.llamacpp.convert import conversion_source, with_n_ctx
from bench.llamacpp.greedy import match_pieces
from bench.llamacpp.tools import (
    batched_argv,
    bench_argv,
    parse_batched_bench,
    parse_batched_rows,
    parse_llama_bench,
    parse_token_ids,
)

LLAMA = LlamaCpp("0.0.0", Path("/src/llama.cpp"), Path("/build/bin"))


def llama_bench_test(n_prompt: int, n_gen: int, samples: list[float]) -> str:
    """One test object as llama-bench's json printer writes it (fields abridged to the ones it always has)."""
    ns = [int(1e9 * max(n_prompt, n_gen) / s) for s in samples]
    return (
        "  {\n"
        '    "build_commit": "0c1e5709",\n    "build_number": 1,\n'
        '    "cpu_info": "AMD EPYC 9R14",\n    "gpu_info": "",\n    "backends": "CPU",\n'
        '    "model_filename": "/tmp/f32.gguf",\n    "model_type": "gpt2 0.4B all F32",\n'
        '    "model_size": 1419730944,\n    "model_n_params": 354823168,\n    "n_batch": 2048,\n'
        '    "n_ubatch": 512,\n    "n_threads": 2,\n    "cpu_mask": "0x0",\n    "cpu_strict": false,\n'
        f'    "n_prompt": {n_prompt},\n    "n_gen": {n_gen},\n    "n_depth": {32 if n_gen else 0},\n'
        '    "test_time": "2026-11-30T11:00:00Z",\n'
        f'    "avg_ns": {int(statistics.mean(ns))},\n    "stddev_ns": 1000,\n'
        f'    "avg_ts": {statistics.mean(samples):.6f},\n    "stddev_ts": 0.5,\n'
        f'    "samples_ns": [ {", ".join(map(str, ns))} ],\n'
        f'    "samples_ts": [ {", ".join(f"{s:.6f}" for s in samples)} ]\n'
        "  }"
    )


def rand_rates(n: int, low: float, high: float) -> list[float]:
    return [random.uniform(low, high) for _ in range(n)]


def test_llama_bench_json_gives_the_median_of_each_test():
    pp, tg = rand_rates(5, 100, 400), rand_rates(5, 10, 90)
    text = f"[\n{llama_bench_test(32, 0, pp)},\n{llama_bench_test(0, 64, tg)}\n]\n"
    out = parse_llama_bench(text)
    assert out["prefill_tok_s"] == pytest.approx(statistics.median(pp), rel=1e-6)
    assert out["decode_tok_s"] == pytest.approx(statistics.median(tg), rel=1e-6)
    assert out["n_threads"] == 2 and out["build_commit"] == "0c1e5709"


def test_llama_bench_without_json_is_one_clear_error():
    with pytest.raises(LlamaCppError, match="no JSON"):
        parse_llama_bench("error: failed to load model\n")


BATCHED_MD = """
main: n_kv_max = 768, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, is_tg_separate = 0, \
n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
{rows}

llama_perf_context_print:        load time =     123.45 ms
"""


def md_row(pp: int, tg: int, b: int, speed_pp: float, speed_tg: float) -> str:
    t_pp, t_tg = b * pp / speed_pp, b * tg / speed_tg
    return (
        f"|{pp:6d} | {tg:6d} | {b:4d} | {b * (pp + tg):6d} | {t_pp:8.3f} | {speed_pp:8.2f} | {t_tg:8.3f} | "
        f"{speed_tg:8.2f} | {t_pp + t_tg:8.3f} | {b * (pp + tg) / (t_pp + t_tg):8.2f} |"
    )


def jsonl_row(pp: int, tg: int, b: int, speed_pp: float, speed_tg: float) -> str:
    return json.dumps(
        {
            "n_kv_max": 768,
            "n_batch": 2048,
            "n_ubatch": 512,
            "flash_attn": -1,
            "is_pp_shared": 0,
            "n_gpu_layers": -1,
            "n_threads": 2,
            "n_threads_batch": 2,
            "pp": pp,
            "tg": tg,
            "pl": b,
            "n_kv": b * (pp + tg),
            "t_pp": b * pp / speed_pp,
            "speed_pp": speed_pp,
            "t_tg": b * tg / speed_tg,
            "speed_tg": speed_tg,
            "t": 1.0,
            "speed": 1.0,
        }  # fmt: skip
    )


@pytest.mark.parametrize("fmt", ["md", "jsonl"])
def test_batched_bench_rows_and_medians(fmt):
    pp, tg = rand_rates(3, 100, 400), rand_rates(3, 50, 200)
    make = md_row if fmt == "md" else jsonl_row
    rows = [make(32, 64, 8, a, b) for a, b in zip(pp, tg)] + [make(32, 64, 1, 1.0, 1.0)]  # another batch
    text = BATCHED_MD.format(rows="\n".join(rows)) if fmt == "md" else "\n".join(["main: loading", *rows, ""])
    parsed = parse_batched_rows(text)
    assert [int(r["pl"]) for r in parsed] == [8, 8, 8, 1]
    out = parse_batched_bench(text, 8)
    digits = 1e-2 if fmt == "md" else 1e-9  # the table prints two decimals
    assert out["prefill_tok_s"] == pytest.approx(statistics.median(pp), abs=digits)
    assert out["decode_tok_s"] == pytest.approx(statistics.median(tg), abs=digits)
    assert out["rows"] == 3
    with pytest.raises(LlamaCppError, match="no row for batch 4"):
        parse_batched_bench(text, 4)


def test_batched_argv_sizes_the_context_and_repeats_the_batch():
    batch, p, n = random.randint(2, 16), random.randint(1, 64), random.randint(2, 128)
    argv = batched_argv(LLAMA, Path("/m.gguf"), 2, batch, p, n, reps=3)
    assert argv[0] == "/build/bin/llama-batched-bench"
    assert argv[argv.index("-c") + 1] == str(batch * (p + n))
    assert argv[argv.index("-npl") + 1] == f"{batch},{batch},{batch}"
    assert argv[argv.index("-t") + 1] == argv[argv.index("-tb") + 1] == "2"


def test_repack_is_on_by_default_and_can_be_turned_off():
    on, off = bench_argv(LLAMA, Path("/m.gguf"), 2, 32, 0), bench_argv(LLAMA, Path("/m.gguf"), 2, 32, 0, repack=False)
    assert on[on.index("--repack") + 1] == "1" and off[off.index("--repack") + 1] == "0"
    assert "--no-repack" not in batched_argv(LLAMA, Path("/m.gguf"), 2, 8, 32, 64)
    assert "--no-repack" in batched_argv(LLAMA, Path("/m.gguf"), 2, 8, 32, 64, repack=False)


def test_a_crash_with_repacked_weights_reruns_that_gguf_without_repacking():
    args = parse_args([])
    word = f"rate-{random.randrange(10**6)}"
    calls = []

    def fake_tool(llama, gguf, threads, *test, repack):  # crashes (SIGSEGV) on q8_0 when repacked
        calls.append((gguf.name, repack))
        crash = repack and gguf.stem == "q8_0"
        return ["sh", "-c", "kill -SEGV $$" if crash else f"echo {word}"]

    for name in ("f16.gguf", "q8_0.gguf", "q8_0.gguf"):
        assert run_llama(fake_tool, LLAMA, Path(name), args).decode().strip() == word
    assert calls == [("f16.gguf", True), ("q8_0.gguf", True), ("q8_0.gguf", False), ("q8_0.gguf", False)]
    assert args.unpacked == ["q8_0"]
    with pytest.raises(LlamaCppError) as failed:  # a plain failure is not retried
        run_llama(lambda *a, repack: ["sh", "-c", "exit 3"], LLAMA, Path("f32.gguf"), args)
    assert not isinstance(failed.value, LlamaCppCrash)


def test_token_ids_from_llama_tokenize():
    ids = [random.randrange(50257) for _ in range(random.randint(1, 40))]
    assert parse_token_ids(f"[{', '.join(map(str, ids))}]\n") == ids
    assert parse_token_ids("[]\n") == []
    with pytest.raises(LlamaCppError):
        parse_token_ids("error: unable to load vocab\n")


def test_with_n_ctx_adds_n_positions_for_the_converter():
    n = random.randint(16, 4096)
    config = {"model_type": "gpt2", "n_positions": n, "n_embd": 64}
    patched = with_n_ctx(config)
    assert patched == {**config, "n_ctx": n} and "n_ctx" not in config  # a copy
    assert with_n_ctx({"n_ctx": 7, "n_positions": n})["n_ctx"] == 7  # an older config keeps its own
    with pytest.raises(LlamaCppError, match="n_positions"):
        with_n_ctx({"model_type": "gpt2"})


def test_conversion_source_links_the_files_and_patches_the_config(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    n = random.randint(16, 4096)
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": n}))
    payload = random.randbytes(64)
    (hf / "model.safetensors").write_bytes(payload)
    src = conversion_source(hf, tmp_path / "src")
    assert (src / "model.safetensors").is_symlink() and (src / "model.safetensors").read_bytes() == payload
    assert json.loads((src / "config.json").read_text())["n_ctx"] == n
    assert "n_ctx" not in json.loads((hf / "config.json").read_text())  # the checkpoint itself is untouched
    conversion_source(hf, tmp_path / "src")  # again: links already there


def pieces_and_text() -> tuple[list[bytes], bytes, bytes]:
    pieces = [random.randbytes(random.randint(1, 4)) for _ in range(random.randint(3, 20))]
    echo = random.randbytes(random.randint(1, 30))
    return pieces, echo, echo + b"".join(pieces) + b"\n"


def test_greedy_pieces_that_spell_llama_cpps_text_match():
    pieces, echo, printed = pieces_and_text()
    match = match_pieces(pieces, printed, echo)
    assert match.ok and match.matched == match.total == len(pieces)
    assert "equal" in match.describe()


def test_greedy_reports_the_first_token_that_differs():
    pieces, echo, _ = pieces_and_text()
    k = random.randrange(len(pieces))
    theirs = list(pieces)
    theirs[k] = bytes([(theirs[k][0] + 1) % 256]) + theirs[k][1:]  # same length, another first byte
    match = match_pieces(pieces, echo + b"".join(theirs) + b"\n", echo)
    assert not match.ok and match.first_mismatch == k and match.matched == k and match.ours_piece == pieces[k]
    assert f"MISMATCH at token {k}" in match.describe()


def test_greedy_flags_a_different_prompt_and_a_longer_continuation():
    pieces, echo, printed = pieces_and_text()
    assert match_pieces(pieces, b"x" + printed, b"y" + echo).first_mismatch == 0
    longer = match_pieces(pieces[:-1], printed, echo)  # llama.cpp printed one more token than we made
    assert not longer.ok and longer.first_mismatch == len(pieces) - 1


def test_pairs_follow_the_asked_types():
    assert tbl.ours_for(["f32", "f16", "q8_0"]) == ["fp32", "bf16", "fp16", "int8"]
    assert tbl.ours_for(["q8_0"]) == ["int8"]
    assert tbl.pairs_for(["fp32", "bf16"], ["f32", "f16", "bf16"]) == [
        ("fp32", "f32"),
        ("bf16", "f16"),
        ("bf16", "bf16"),
    ]


def test_rows_are_medians_over_rounds_and_ratios_ours_over_theirs():
    def rounds(n: int) -> list[dict]:
        return [dict(prefill_tok_s=random.uniform(50, 500), decode_tok_s=random.uniform(5, 200)) for _ in range(n)]

    measured = {("ours", "fp32", 1): rounds(3), ("llama.cpp", "f32", 1): rounds(3), ("ours", "int8", 1): rounds(3)}
    measured["ours", "fp32", 1][1]["decode_tok_s"] = math.nan  # lost in the noise: left out of the median
    rows = tbl.rows(measured, [("fp32", "f32"), ("int8", "q8_0")], [1, 8])
    assert len(rows) == 1  # int8 has no peer measured, batch 8 nothing
    (row,) = rows
    ours, theirs = measured["ours", "fp32", 1], measured["llama.cpp", "f32", 1]
    decode = statistics.median([ours[0]["decode_tok_s"], ours[2]["decode_tok_s"]])
    assert row["ours_decode"] == pytest.approx(decode)
    assert row["decode_ratio"] == pytest.approx(decode / statistics.median(r["decode_tok_s"] for r in theirs))
    prefill = statistics.median(r["prefill_tok_s"] for r in ours)
    assert row["prefill_ratio"] == pytest.approx(prefill / statistics.median(r["prefill_tok_s"] for r in theirs))
    text = tbl.markdown(rows)
    assert text.count("\n") == 2 and f"{row['decode_ratio']:.2f}x" in text and "| 1 | fp32 | f32 |" in text


def test_cli_refuses_bad_input_with_exit_2(capsys):
    for argv in (["--threads", "0"], ["--new-tokens", "1"], ["--batches", "0"], ["--dtypes", "q4_0"],
                 ["--ours", "int8", "--dtypes", "f32"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2
        assert "error: " in capsys.readouterr().err.strip().splitlines()[-1]
    args = parse_args(["--dtypes", "f32", "q8_0", "--model-size", "gpt2"])
    assert args.ours == ["fp32", "int8"] and args.pairs == [("fp32", "f32"), ("int8", "q8_0")]


def test_cached_build_is_found_or_refused_with_skip_build(tmp_path):
    from bench.llamacpp.build import TOOLS, cached, ensure_built, is_built

    version = f"9.9.{random.randint(0, 99)}"
    with pytest.raises(LlamaCppError, match="--skip-build"):
        ensure_built(version, skip_build=True, root=tmp_path)
    llama = cached(version, tmp_path)
    llama.source.mkdir(parents=True)
    llama.converter.write_text("")
    llama.bin.mkdir(parents=True)
    for tool in TOOLS[:-1]:
        llama.tool(tool).write_text("")
    assert not is_built(llama)  # one tool missing
    llama.tool(TOOLS[-1]).write_text("")
    assert ensure_built(version, skip_build=True, root=tmp_path) == llama
    commit = random.randbytes(4).hex()[:7]
    (llama.bin.parent / "common").mkdir()
    (llama.bin.parent / "common" / "build-info.cpp").write_text(f'char const * LLAMA_COMMIT = "{commit}";\n')
    assert llama.commit() == commit


def run_result(measured: dict, pairs: list[tuple[str, str]], batches: list[int]) -> dict:
    """What bench/llama_cpp.py writes, for ``measured``."""
    machine = dict(cpu="Test CPU", date="2026-12-01T00:00:00+00:00", git_commit="0123456789abcdef")
    settings = dict(model="gpt2", prompt_tokens=32, new_tokens=64, threads=2, rounds=1)
    return dict(complete=True, machine=machine, settings=settings, rows=tbl.rows(measured, pairs, batches))


def test_plot_draws_a_bar_per_finite_ratio_and_the_cli_redraws_a_saved_run(tmp_path, capsys):
    from bench.llama_cpp import main
    from bench.llamacpp.plot import figure

    pairs, batches = [("fp32", "f32"), ("int8", "q8_0")], [1, 8]
    measured = {}
    for batch in batches:
        for o, p in pairs:
            for side, name in (("ours", o), ("llama.cpp", p)):
                rates = dict(prefill_tok_s=random.uniform(50, 500), decode_tok_s=random.uniform(5, 200))
                measured[side, name, batch] = [rates]
    measured["ours", "int8", 8][0]["decode_tok_s"] = math.nan  # a rate not measured: no bar, no crash
    result = run_result(measured, pairs, batches)
    prefill, decode = figure(result).axes
    for ax, phase in ((prefill, "prefill"), (decode, "decode")):
        heights = sorted(bar.get_height() for bar in ax.patches)
        ratios = sorted(r[f"{phase}_ratio"] for r in result["rows"] if math.isfinite(r[f"{phase}_ratio"]))
        assert heights == pytest.approx(ratios) and len(heights) == (4 if phase == "prefill" else 3)
        low, high = ax.get_ylim()
        assert low < min(ratios + [1.0]) and high > max(ratios + [1.0])  # every bar and the line at 1 in view

    saved = tmp_path / "llama_cpp_test.json"
    saved.write_text(json.dumps(result).replace("NaN", "null"))  # as write_json stores NaN
    assert main(["--plot", str(saved)]) == 0
    assert saved.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    for bad in (tmp_path / "missing.json", tmp_path / "other.json"):
        with pytest.raises(SystemExit) as e:
            main(["--plot", str(bad)])
        assert e.value.code == 2 and str(bad) in capsys.readouterr().err.strip().splitlines()[-1]
