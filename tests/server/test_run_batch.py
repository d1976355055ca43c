"""``gpt2-triton run-batch`` as a process: OpenAI batch lines in, their answers out in the same order, each the body
the server would send (completions, embeddings, a LoRA adapter by name, 4xx bodies for what the server refuses);
a file that is not a batch is one line on stderr, exit code 2, and no output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from tests.helpers import make_adapter, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_batch(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "engine", "run-batch", *args, "--backend", "torch", "--device", "cpu", "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT,
                          timeout=300)  # fmt: skip


def line(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}) + "\n"


def test_each_line_gets_the_servers_answer_in_order(tiny_checkpoint, hf_model, tmp_path):
    adapter = tmp_path / "adapter"
    make_adapter(hf_model, adapter, r=4, target_modules=["c_attn", "c_fc"])
    greedy = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    requests = [
        ("plain", "/v1/completions", {"model": "tiny", "prompt": "Once upon a time", **greedy}),
        ("adapted", "/v1/completions", {"model": "ad", "prompt": "Once upon a time", **greedy}),
        ("bad field", "/v1/completions", {"model": "tiny", "prompt": "Hi", "top_p": 5}),
        ("vectors", "/v1/embeddings", {"model": "tiny", "input": ["one text", "another text"]}),
        ("no template", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}),
        ("stream", "/v1/completions", {"model": "tiny", "prompt": "Hi", "stream": True}),
        ("unknown model", "/v1/embeddings", {"model": "other", "input": "Hi"}),
    ]
    batch, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    batch.write_text("".join(line(*r) for r in requests) + "\n")  # a blank line is skipped
    r = run_batch("-i", str(batch), "-o", str(out), "--model", str(tiny_checkpoint), "--served-model-name", "tiny",
                  "--lora-modules", f"ad={adapter}", "--max-lora-rank", "4", "--max-concurrency", "3")  # fmt: skip
    assert r.returncode == 0, r.stderr
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a["custom_id"] for a in answers] == [c for c, _, _ in requests]
    status = {a["custom_id"]: a["response"]["status_code"] for a in answers}
    assert status == {"plain": 200, "adapted": 200, "bad field": 400, "vectors": 200, "no template": 400,
                      "stream": 400, "unknown model": 404}  # fmt: skip
    body = {a["custom_id"]: a["response"]["body"] for a in answers}
    assert body["bad field"]["error"]["param"] == "top_p" and body["stream"]["error"]["param"] == "stream"

    llm = LLM(str(tiny_checkpoint), device="cpu", progress=False, enable_lora=True, max_lora_rank=4)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    lora = LoRARequest("ad", 1, str(adapter))
    for name, request in (("plain", None), ("adapted", lora)):
        want = llm.generate("Once upon a time", params, use_tqdm=False, lora_request=request)[0].outputs[0].text
        assert body[name]["choices"][0]["text"] == want and body[name]["model"] == ("ad" if request else "tiny")
    assert body["plain"]["choices"][0]["text"] != body["adapted"]["choices"][0]["text"]
    vectors = [torch.tensor(d["embedding"]) for d in body["vectors"]["data"]]
    for got, want in zip(vectors, llm.embed(["one text", "another text"]), strict=True):
        assert rel_err(got, torch.tensor(want.outputs.embedding)) < 1e-6


@pytest.mark.parametrize(
    "content, match",
    [('{"custom_id": "a", "url": "/v1/completions", "body": {}\n', "line 1: not JSON"),
     (line("a", "/v1/completions", {}) + line("a", "/v1/completions", {}), "line 2: custom_id 'a' is used twice"),
     (line("a", "/v1/models", {}), "line 1: POST /v1/models is not one of"),
     ('["a list"]\n', "line 1: a request is"), ("\n", "holds no requests")],
)  # fmt: skip
def test_a_file_that_is_not_a_batch_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, content, match):
    batch, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    batch.write_text(content)
    r = run_batch("-i", str(batch), "-o", str(out), "--model", str(tiny_checkpoint))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
