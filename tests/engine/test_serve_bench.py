"""``bench/serve.py`` (its pieces in ``bench/serving/``): the client end to end against a stub OpenAI server in this
process and against our real server launched by the script, the metrics and comparison on hand-made results, the
server launcher on a throwaway HTTP server, and the offline figure through ``bench/throughput.py``. Servers listen
on 127.0.0.1 and a free port and are stopped; timings are never asserted beyond being non-negative."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import random
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import Request  # at module level: FastAPI resolves the handler's (string) annotation from here

BENCH = Path(__file__).resolve().parents[2] / "bench"
CHUNKS = 3  # text chunks the stub streams per request (= max_tokens of the test's workload)
SUMMARY_FIELDS = {"completed", "failed", "errors", "duration_s", "total_input_tokens", "total_output_tokens",
                  "request_throughput", "output_throughput", "total_token_throughput", "goodput_slos_ms",
                  "good_requests", "request_goodput", "full_length", "output_tokens_from_usage",
                  "prompt_tokens_mismatched", "cached_prompt_tokens", "ttft_ms", "tpot_ms", "itl_ms",
                  "e2el_ms"}  # fmt: skip


@pytest.fixture
def bench(monkeypatch):
    """The script and its package, imported as ``python bench/serve.py`` imports them (bench/ first on sys.path)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import serve
    from serving import client, compare, metrics, runner, servers, workload

    return SimpleNamespace(serve=serve, client=client, compare=compare, metrics=metrics, runner=runner,
                           servers=servers, workload=workload)  # fmt: skip


def stub_app(bodies: list[dict], fail: set[int], hang: set[int], no_usage: set[int], resets: list[int]):
    """A /v1/completions that streams ``CHUNKS`` text chunks 10 ms apart, a finish chunk, usage (``k`` cached prompt
    tokens) and [DONE]; the ``k``-th request it receives (from 0) answers 500 if ``k`` is in ``fail``, stops after one
    chunk for a minute if in ``hang``, and sends no usage if in ``no_usage``. ``POST /reset_prefix_cache`` appends
    the number of requests received so far to ``resets``."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        resets.append(len(bodies))
        return {}

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        k = len(bodies)
        bodies.append(body)
        if k in fail:
            return JSONResponse({"error": {"message": "stub failure"}}, status_code=500)

        def event(payload) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async def stream():
            for i in range(CHUNKS):
                await asyncio.sleep(0.01)
                yield event({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]})
                if k in hang:
                    await asyncio.sleep(60)
            yield event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
            if k not in no_usage:
                usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": CHUNKS}
                usage |= {"total_tokens": sum(usage.values()), "prompt_tokens_details": {"cached_tokens": k}}
                yield event({"choices": [], "usage": usage})
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@contextlib.contextmanager
def running(app, port: int):
    """uvicorn serving ``app`` on 127.0.0.1:``port`` in a thread, stopped on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the stub server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "the stub server did not stop"


def test_client_end_to_end(bench, tmp_path, gpt2_ranks_file):
    bodies: list[dict] = []
    # request 0 is the warm-up; then the run's requests 1..6 one at a time (max concurrency 1), so the k-th request the
    # stub receives is the run's (k - 1)-th: #3 fails, #5 hangs past the timeout, #6 sends no usage
    resets: list[int] = []
    app = stub_app(bodies, fail={3}, hang={5}, no_usage={6}, resets=resets)
    out = tmp_path / "serve.json"
    with running(app, bench.servers.free_port()) as url:
        argv = ["--base-url", url, "--num-prompts", "6", "--input-len", "8", "--output-len", str(CHUNKS),
                "--range-ratio", "0", "--max-concurrency", "1", "--timeout", "1.5", "--goodput", "ttft:60000",
                "e2e:60000", "--percentiles", "50", "90", "--save-requests", "--seed", str(random.randrange(1000)),
                "--reset-prefix-cache", "--output-json", str(out)]  # fmt: skip
        assert bench.serve.main(argv) == 0
    report = json.loads(out.read_text())

    assert len(bodies) == 7 and resets == [1]  # after the warm-up, before the run
    warm, first = bodies[0], bodies[1]
    assert first["model"] == "stub-model"  # from /v1/models
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    assert first["max_tokens"] == CHUNKS and first["temperature"] == 0.0
    assert first["ignore_eos"] is True and first["min_tokens"] == CHUNKS
    assert isinstance(first["prompt"], list) and all(isinstance(t, int) for t in first["prompt"])
    assert warm["max_tokens"] == CHUNKS and abs(len(warm["prompt"]) - 8) <= 1
    assert len({json.dumps(b["prompt"]) for b in bodies}) == 7  # warm-up and run prompts all differ

    assert {"cpu", "cores", "versions", "date", "git_commit"} <= set(report["machine"])
    assert report["args"]["num_prompts"] == 6 and report["args"]["goodput"] == {"ttft": 60000.0, "e2el": 60000.0}
    assert report["servers"][0]["model"] == "stub-model" and report["servers"][0]["warmup"]["ok"] == 1
    [run] = report["runs"]
    assert run["rate"] == "inf" and run["peak_in_flight"] == 1
    s = run["summary"]
    assert set(s) == SUMMARY_FIELDS
    assert s["completed"] == 4 and s["failed"] == 2
    assert any("HTTP 500" in e for e in s["errors"]) and any("timed out after 1.5 s" in e for e in s["errors"])
    assert s["good_requests"] == 4 and s["request_goodput"] > 0  # every completed request is within 60 s SLOs
    assert s["full_length"] == 4 and s["output_tokens_from_usage"] == 3  # request 6 is counted from its chunks
    assert s["total_output_tokens"] == 4 * CHUNKS and s["prompt_tokens_mismatched"] == 0
    assert s["cached_prompt_tokens"] == 1 + 2 + 4  # requests 1, 2 and 4 said how many (6 sent no usage)
    assert s["total_input_tokens"] == sum(len(b["prompt"]) for k, b in enumerate(bodies) if k in (1, 2, 4, 6))
    assert s["ttft_ms"]["count"] == 4 and s["tpot_ms"]["count"] == 4 and s["e2el_ms"]["count"] == 4
    assert s["itl_ms"]["count"] == 4 * (CHUNKS - 1)  # gaps between text chunks
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        d = s[metric]
        assert {"mean", "median", "std", "min", "max", "p50", "p90"} <= set(d)
        assert 0 <= d["min"] <= d["median"] <= d["p90"] <= d["max"]
    assert s["ttft_ms"]["max"] <= s["e2el_ms"]["max"]

    rows = run["requests"]
    assert [r["index"] for r in rows] == list(range(6))
    assert [r["ok"] for r in rows] == [True, True, False, True, False, True]
    for r in rows:
        if r["ok"]:
            assert r["chunks"] == CHUNKS and len(r["itl_s"]) == CHUNKS - 1 and r["text"] == " t0 t1 t2"
            assert 0 < r["ttft_s"] <= r["e2e_s"] and r["tpot_s"] >= 0
            assert r["finish_reason"] == "length" and r["output_tokens"] == CHUNKS
    assert rows[2]["error"].startswith("HTTP 500") and rows[2]["ttft_s"] is None
    assert rows[4]["error"] == "timed out after 1.5 s" and rows[4]["ttft_s"] is not None  # one chunk, then nothing
    assert rows[5]["output_tokens_from"] == "chunks" and rows[5]["server_prompt_tokens"] is None
    assert report["comparison"] is None


def test_against_our_server(bench, tmp_path, tiny_checkpoint):
    """``--launch ours``: the script starts ``python -m engine serve`` on the tiny checkpoint, runs a Poisson rate and
    saturation, and stops it; every request completes at its full length and the server counts our prompt tokens."""
    out = tmp_path / "ours.json"
    n = random.randint(3, 6)
    argv = ["--launch", "ours", "--checkpoint", str(tiny_checkpoint), "--sweep", "20", "inf", "--num-prompts", str(n),
            "--input-len", "12", "--output-len", "5", "--max-num-seqs", "8", "--seed", str(random.randrange(1000)),
            "--server-log-dir", str(tmp_path / "logs"), "--server-startup-timeout", "120", "--timeout", "60",
            "--output-json", str(out)]  # fmt: skip
    assert bench.serve.main(argv) == 0
    report = json.loads(out.read_text())

    [server] = report["servers"]
    assert server["error"] is None and server["warmup"]["ok"] == 1 and server["model"]
    assert server["command"][1:4] == ["-m", "engine", "serve"] and "--max-num-seqs" in server["command"]
    assert [r["label"] for r in report["runs"]] == ["rate 20.0", "rate inf"]
    for run in report["runs"]:
        s, w = run["summary"], report["workloads"][run["label"]]
        assert w["num_prompts"] == n and s["completed"] == n and s["failed"] == 0 and not s["errors"]
        assert s["full_length"] == n and s["output_tokens_from_usage"] == n and s["prompt_tokens_mismatched"] == 0
        assert s["cached_prompt_tokens"] == 0  # said, and none: no prompt repeats another's start
        assert s["total_output_tokens"] == w["output_tokens"] and s["total_input_tokens"] == w["prompt_tokens"]
        assert s["ttft_ms"]["count"] == n and s["e2el_ms"]["count"] == n
        assert s["itl_ms"]["count"] <= w["output_tokens"] - n  # text chunks: at most one per token after the first
        assert 0 <= s["ttft_ms"]["min"] <= s["e2el_ms"]["max"] and s["output_throughput"] > 0
    assert out.with_suffix(".png").stat().st_size > 0  # the sweep's plot
    port = int(server["base_url"].rsplit(":", 1)[1])
    assert bench.servers.http_get_json(f"http://127.0.0.1:{port}/health", timeout=1)[0] == 0  # stopped


def test_lora_models_round_robin_against_our_server(bench, tmp_path, tiny_checkpoint, hf_model):
    """``--lora-models``: request i asks for the i-th name, round robin; ours launched with an adapter serves both the
    adapter's and the base model's requests whole."""
    from tests.helpers import make_adapter

    make_adapter(hf_model, tmp_path / "adapter", r=4, target_modules=["c_attn"])
    server = SimpleNamespace(model="default", prompt_format="ids", eos_extras=lambda n, ignore: {})
    workload = SimpleNamespace(output_lens=[3] * 5, prompt=lambda i, fmt: [1, 2, 3])
    args = SimpleNamespace(ignore_eos=True, extra_body={}, lora_models=["a", "base"])
    models = [bench.client.request_body(server, workload, i, args)["model"] for i in range(5)]
    assert models == ["a", "base", "a", "base", "a"]
    out, n = tmp_path / "lora.json", 6
    ours_args = f"--served-model-name base --lora-modules a={tmp_path / 'adapter'} --max-lora-rank 4"
    argv = ["--launch", "ours", "--checkpoint", str(tiny_checkpoint), "--num-prompts", str(n), "--input-len", "8",
            "--output-len", "4", "--max-num-seqs", "4", "--ours-args", ours_args, "--lora-models", "a", "base",
            "--server-log-dir", str(tmp_path / "logs"), "--server-startup-timeout", "120", "--timeout", "60",
            "--output-json", str(out)]  # fmt: skip
    assert bench.serve.main(argv) == 0
    [run] = json.loads(out.read_text())["runs"]
    assert run["summary"]["completed"] == n and run["summary"]["failed"] == 0


def result(bench, ok=True, ttft=None, e2e=None, out=0, itl=()):
    if not ok:
        return bench.client.RequestResult(0, 10, out, error="boom")
    return bench.client.RequestResult(0, prompt_tokens=10, expected_output_tokens=out, ok=True, ttft_s=ttft, e2e_s=e2e,
                                      itl_s=list(itl), output_tokens=out, chunks=out)  # fmt: skip


def test_summary_and_goodput(bench):
    m = bench.metrics
    results = [
        result(bench, ttft=0.1, e2e=0.5, out=5, itl=[0.1] * 4),  # TPOT 100 ms
        result(bench, ttft=0.4, e2e=0.6, out=3, itl=[0.1, 0.1]),  # TPOT 100 ms, slow first token
        result(bench, ttft=0.05, e2e=0.05, out=1),  # one token: no TPOT, passes a TPOT SLO (vLLM counts 0)
        result(bench, ok=False, out=4),
    ]
    s = m.summarize(results, 2.0, [99.0], m.parse_goodput(["ttft:200", "tpot:150"]))
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, {"boom": 1})
    assert s["good_requests"] == 2 and s["request_goodput"] == 1.0
    assert s["total_output_tokens"] == 9 and s["output_throughput"] == 4.5 and s["request_throughput"] == 1.5
    assert s["total_input_tokens"] == 30 and s["total_token_throughput"] == 19.5
    assert s["tpot_ms"]["count"] == 2 and s["tpot_ms"]["median"] == pytest.approx(100.0)
    assert s["itl_ms"]["count"] == 6 and s["ttft_ms"]["median"] == pytest.approx(100.0)
    assert set(s["e2el_ms"]) == {"count", "mean", "median", "std", "min", "max", "p99"}
    tight = m.summarize(results, 2.0, [99.0], m.parse_goodput(["ttft:200", "e2e:300"]))
    assert tight["good_requests"] == 1  # only the one-token request is under 300 ms end to end
    assert m.summarize(results, 2.0, [], {})["request_goodput"] is None
    empty = m.summarize([result(bench, ok=False)], 1.0, [99.0], {})
    assert empty["completed"] == 0 and empty["ttft_ms"] == {"count": 0, "mean": None, "median": None, "std": None,
                                                            "min": None, "max": None, "p99": None}  # fmt: skip
    for bad in (["ttft"], ["speed:3"], ["tpot:fast"], ["ttft:-1"]):
        with pytest.raises(SystemExit):
            m.parse_goodput(bad)


def summary(output_tps: float, median_ttft_ms: float, req_s: float = 1.0) -> dict:
    return {"completed": 4, "output_throughput": output_tps, "request_throughput": req_s,
            "ttft_ms": {"median": median_ttft_ms}}  # fmt: skip


def test_compare_ratios_goals_and_moderate_rate(bench):
    Run, c = bench.runner.Run, bench.compare
    ours_tps, cb_tps, ours_ttft, cb_ttft = (random.uniform(1, 100) for _ in range(4))
    runs = [Run("transformers-cb", "saturation", float("inf"), {}, summary(cb_tps, 1.0, req_s=0.8)),
            Run("transformers-cb", "moderate", 0.4, {}, summary(1.0, cb_ttft)),
            Run("ours", "saturation", float("inf"), {}, summary(ours_tps, 1.0, req_s=3.0)),
            Run("ours", "moderate", 0.4, {}, summary(1.0, ours_ttft)),
            Run("transformers", "saturation", float("inf"), {}, None, error="not run")]  # fmt: skip
    offline = {"output_tokens_per_s": ours_tps * 2}
    found = c.ratios(runs, ["transformers-cb", "transformers"], offline)
    assert found == pytest.approx({"saturation_output_tps:ours/transformers-cb": ours_tps / cb_tps,
                                   "moderate_median_ttft:transformers-cb/ours": cb_ttft / ours_ttft,
                                   "saturation_output_tps:ours/offline": 0.5})  # fmt: skip
    rows = c.goals(found)
    assert [r["status"] for r in rows] == [
        "PASS" if ours_tps / cb_tps >= 3 else "MISS",
        "PASS" if cb_ttft / ours_ttft >= 2 else "MISS",
        "MISS",  # 0.5 of the offline figure, under 0.9
    ]
    assert [r["status"] for r in c.goals({})] == ["SKIP"] * 3

    args = SimpleNamespace(moderate_rate=None, moderate_fraction=0.5)
    assert bench.runner.moderate_rate(runs, args)[0] == pytest.approx(0.4)  # half of transformers-cb's 0.8 req/s
    assert bench.runner.moderate_rate(runs[2:], args)[0] == pytest.approx(1.5)  # no transformers-cb: the first
    assert bench.runner.moderate_rate(runs[4:], args) == (None, "no saturation run completed")
    assert bench.runner.moderate_rate(runs, SimpleNamespace(moderate_rate=2.5))[0] == 2.5


def test_ray_replica_servers_and_their_ratios(bench, tmp_path):
    args = bench.serve.parse_args(["--ray-replicas", "1", "2", "--num-prompts", "2"])
    made = [bench.servers.ray_server(n, tmp_path, tmp_path, args) for n in (1, 2)]
    assert [s.name for s in made] == ["ours-ray1", "ours-ray2"]
    assert all(s.command[s.command.index("--replicas") + 1] == str(n) for s, n in zip(made, (1, 2)))
    assert all(s.base_url.endswith(s.command[s.command.index("--port") + 1]) for s in made)
    one, two = random.uniform(1, 100), random.uniform(1, 100)
    Run = bench.runner.Run
    runs = [Run("ours-ray1", "rate inf", float("inf"), {}, summary(one, 1.0)),
            Run("ours-ray2", "rate inf", float("inf"), {}, summary(two, 1.0)),
            Run("ours", "rate inf", float("inf"), {}, summary(5.0, 1.0))]  # fmt: skip
    assert bench.compare.replica_ratios(runs) == pytest.approx({"rate inf_output_tps:ours-ray2/ours-ray1": two / one})
    with pytest.raises(SystemExit):
        bench.serve.parse_args(["--ray-replicas", "0"])


def test_offline_figure_from_throughput_script(bench, tmp_path, monkeypatch):
    """--compare's offline figure: bench/throughput.py's own parser takes the command (ours only, the same checkpoint,
    sizes and engine flags), and ours' row of a JSON in its shape is read. (Running it costs ~20 s of startup;
    tests/engine/test_throughput_bench.py runs the script and checks that shape.)"""
    args = bench.serve.parse_args(["--compare", "--num-prompts", "5", "--input-len", "6", "--output-len", "3",
                                   "--range-ratio", "0.25", "--max-num-seqs", "4", "--seed", "9"])  # fmt: skip
    cmd = bench.compare.offline_command(args, tmp_path, tmp_path / "offline.json")
    assert cmd[1] == str(BENCH / "throughput.py")
    spec = importlib.util.spec_from_file_location("bench_throughput", cmd[1])
    throughput = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, throughput)  # dataclasses look their module up while it executes
    spec.loader.exec_module(throughput)
    parsed = throughput.parse_args(cmd[2:])
    assert (parsed.model, parsed.scenario, parsed.peers) == (str(tmp_path), "random", [])
    assert (parsed.num_prompts, parsed.input_len, parsed.output_len, parsed.range_ratio) == (5, 6, 3, 0.25)
    assert (parsed.seed, parsed.max_num_seqs, parsed.dtype, parsed.output_json) == (
        9,
        4,
        "float32",
        str(tmp_path / "offline.json"),
    )

    tps = random.uniform(1, 200)
    rows = [{"system": "ours", "output_tokens_per_s": tps}, {"system": "generate", "output_tokens_per_s": 1.0}]
    report = {"machine": {"cpu": "c", "date": "d"}, "scenarios": {"random": {"workload": {"num_prompts": 5},
                                                                             "results": rows}}}  # fmt: skip
    (tmp_path / "t.json").write_text(json.dumps(report))
    args.offline = str(tmp_path / "t.json")
    figure, why = bench.compare.offline_figure(args, tmp_path, tmp_path, ["ours"])
    assert why is None and figure["output_tokens_per_s"] == tps and figure["workload"] == {"num_prompts": 5}
    args.offline = None  # the default with --compare: run it, but only for ours, on random prompts
    assert bench.compare.offline_figure(args, tmp_path, tmp_path, ["transformers-cb"]) == (
        None,
        "ours is not launched here",
    )
    args.offline = "none"
    assert bench.compare.offline_figure(args, tmp_path, tmp_path, ["ours"]) == (None, "--offline none")


def test_arrivals_and_prompts(bench, gpt2_ranks_file):
    seed = random.randrange(2**31)
    arrivals = bench.client.arrival_offsets
    assert arrivals(5, float("inf"), 1.0, seed) == [0.0] * 5
    times = arrivals(4000, 8.0, 1.0, seed)
    assert times[0] == 0 and all(b >= a for a, b in zip(times, times[1:]))
    assert times == arrivals(4000, 8.0, 1.0, seed)
    assert abs(times[-1] / 3999 - 1 / 8) < 0.1 / 8  # Poisson: mean gap 1 / rate (the tolerance is 6 sigma)

    tok = bench.workload.load_tokenizer(None)
    w = bench.workload.random_workload(tok, 8, 40, 10, 0.5, seed)
    for ids, text in zip(w.prompt_ids, w.prompt_texts):
        assert tok.encode(text) == ids and tok.eos_token_id not in ids  # the same tokens as text and as ids
        assert 20 - 1 <= len(ids) <= 60 + 1
    assert all(5 <= o <= 15 for o in w.output_lens) and len(w) == 8


def test_prompts_file(bench, tmp_path, gpt2_ranks_file):
    tok = bench.workload.load_tokenizer(None)
    ids = [random.randrange(1000, 2000) for _ in range(5)]
    path = tmp_path / "prompts.jsonl"
    path.write_text(f"Hello there\n\n{json.dumps({'prompt': ids, 'output_len': 7})}\n")
    w = bench.workload.file_workload(tok, str(path), None, 4, seed=0)
    assert w.prompt_ids == [tok.encode("Hello there"), ids] and w.prompt_texts[1] == tok.decode(ids)
    assert w.output_lens == [4, 7] and len(bench.workload.file_workload(tok, str(path), 1, 4, seed=0)) == 1


def test_launch_commands_and_refusals(bench, tmp_path):
    args = bench.serve.parse_args(["--compare", "--num-prompts", "2", "--max-num-seqs", "4"])
    made = {k: bench.servers.launched_server(k, tmp_path, tmp_path, args, 7) for k in bench.servers.SERVER_KINDS}
    assert made["ours"].command[1:5] == ["-m", "engine", "serve", str(tmp_path)] and made["ours"].prompt_format == "ids"
    assert "--max-num-seqs" in made["ours"].command and "--continuous-batching" not in made["transformers"].command
    cb = made["transformers-cb"].command
    assert cb[1] == "serve" and "--continuous-batching" in cb and cb[cb.index("--cb-num-blocks") + 1] == "7"
    assert {made[k].prompt_format for k in bench.servers.TRANSFORMERS_KINDS} == {"text"}
    assert made["transformers"].eos_extras(5, True) == {"generation_config": '{"eos_token_id": -1}'}
    assert made["ours"].eos_extras(5, True) == {"ignore_eos": True, "min_tokens": 5}
    assert len({s.base_url for s in made.values()}) == 3
    for bad in (["--compare", "--prompt-format", "ids"], ["--launch", "transformers", "--prompt-format", "ids"],
                ["--launch", "ours", "--offline", "none"], ["--compare", "--sweep", "1"], ["--base-url", "x",
                "--launch", "ours"], ["--launch", "ours", "--range-ratio", "1"]):  # fmt: skip
        with pytest.raises(SystemExit):
            bench.serve.parse_args(bad)


def test_launcher_stops_its_server(bench, tmp_path):
    servers = bench.servers
    port = servers.free_port()
    # answers every GET with 200 and ignores SIGTERM: stopping it takes the SIGKILL after the grace period
    code = ("import http.server as h, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "class H(h.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')\n"
            "    def log_message(self, *a):\n        pass\n"
            f"h.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")  # fmt: skip
    server = servers.Server("fake", "url", f"http://127.0.0.1:{port}", command=[sys.executable, "-c", code],
                            log_path=str(tmp_path / "fake.log"))  # fmt: skip
    with servers.launched(server, startup_timeout_s=30, grace_s=0.5):
        assert servers.http_get_json(server.base_url + "/health")[0] == 200
        assert server.startup_s >= 0
    assert servers.http_get_json(server.base_url + "/health", timeout=1)[0] == 0  # gone

    dead = servers.Server("dead", "url", f"http://127.0.0.1:{servers.free_port()}",
                          command=[sys.executable, "-c", "print('bye'); raise SystemExit(3)"],
                          log_path=str(tmp_path / "dead.log"))  # fmt: skip
    with pytest.raises(RuntimeError, match="exited with code 3"):
        with servers.launched(dead, startup_timeout_s=30, grace_s=0.5):
            pass
    missing = servers.Server("missing", "url", dead.base_url, command=[str(tmp_path / "no-such-server")],
                             log_path=str(tmp_path / "missing.log"))  # fmt: skip
    with pytest.raises(RuntimeError, match="could not start"):
        with servers.launched(missing, startup_timeout_s=30, grace_s=0.5):
            pass
