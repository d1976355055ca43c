"""gpt2-triton: a GPT-2 inference engine whose hot paths are hand-written Triton kernels.

from engine import LLM, SamplingParams
llm = LLM("gpt2-medium")
print(llm.generate("Hello, I'm a language model,", SamplingParams(max_tokens=30))[0].outputs[0].text)
"""

from engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.lora import LoRARequest
from engine.outputs import (
    CompletionOutput,
    EmbeddingRequestOutput,
    EngineStats,
    RequestOutput,
    ScoreOutput,
    StreamDelta,
)
from engine.pipeline import pipeline, set_seed
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.speculative import SpeculativeConfig
from engine.structured_outputs import StructuredOutputsParams

__all__ = [
    "LLM",
    "LLMEngine",
    "SamplingParams",
    "StructuredOutputsParams",
    "SpeculativeConfig",
    "LoRARequest",
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
    "RequestOutputKind",
    "EngineStats",
    "RequestOutput",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "ScoreOutput",
    "StreamDelta",
    "pipeline",
    "set_seed",
]
__version__ = "0.1.0"
