"""LoRA through the Triton backend (the shrink kernel; the expand through the GEMM's residual epilogue) against the
torch backend: a prefill and decode steps that mix adapters and the base model. In the interpreter on CPU; on the
device in gpu_check's tests, where decode runs as CUDA graphs. Adapters are random PEFT files
(``save_random_adapter``): this file needs no peft."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.config import ModelConfig
from engine.lora import save_random_adapter
from tests.helpers import DEVICE, prompt_logprobs, rel_err


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 3e-3)])
def test_the_triton_kernels_serve_adapters_as_the_torch_backend_does(tiny_checkpoint, tmp_path, dtype, tol):
    config = ModelConfig.from_file(tiny_checkpoint / "config.json")
    loras = [LoRARequest(f"a{i}", i + 1, str(save_random_adapter(tmp_path / f"a{i}", config, rank, std=0.2)))
             for i, rank in enumerate((4, 8))]  # fmt: skip
    engines = [LLM(str(tiny_checkpoint), backend=backend, dtype=dtype, device=DEVICE, block_size=4, progress=False,
                   enable_lora=True, max_loras=2, max_lora_rank=8) for backend in ("torch", "triton")]  # fmt: skip
    prompts = [[random.randrange(50256) for _ in range(random.randint(3, 9))] for _ in range(3)]
    per_prompt = [loras[0], None, loras[1]]
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=5, prompt_logprobs=0)
    want, got = (e.generate(prompts, params, use_tqdm=False, lora_request=per_prompt) for e in engines)
    for a, b in zip(got, want):
        assert rel_err(prompt_logprobs(a), prompt_logprobs(b)) < tol  # the prefill
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        if dtype == "float32":  # in fp16 a near-tie may pick another token, and the next context differs
            assert ta == tb
        for step in range(2):  # the prefill's sampled row, then a decode step, while the contexts agree
            if ta[:step] != tb[:step]:
                break
            da, db = a.outputs[0].logprobs[step], b.outputs[0].logprobs[step]
            shared = sorted(set(da) & set(db))  # top-5 of each (and its pick): a near-tie may swap the fifth
            assert len(shared) >= 4
            assert rel_err(torch.tensor([da[t] for t in shared]), torch.tensor([db[t] for t in shared])) < tol
    # the adapters' effect on their prompts (0 and 2) is well past the tolerance, so the checks above can tell an
    # adapter from none: in fp16 it was 0.033 at the least over 48 draws (a single 3-token prompt: 0.013)
    base = engines[0].generate([prompts[0], prompts[2]], params, use_tqdm=False)
    with_adapters, without = (torch.cat([prompt_logprobs(out) for out in outs]) for outs in ([want[0], want[2]], base))
    assert rel_err(with_adapters, without) > 3 * tol, "the adapters did nothing"
