"""The models a server answers to (vLLM's ``OpenAIServingModels``): the base model under its served names, and LoRA
adapters, each under its own name, from ``--lora-modules`` or loaded while it runs
(``--allow-runtime-lora-updating``: ``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

from engine.async_llm import AsyncLLM
from engine.lora import LoRARequest
from engine.server.protocol import ApiError


@dataclass(frozen=True)
class Served:
    """A model name a request asked for, and the LoRA adapter it stands for (None: the base model)."""

    name: str
    lora_request: LoRARequest | None = None


class ServedModels:
    """The names requests may use. An unloaded adapter's requests in flight finish under it; a name loaded again
    gets a new ``lora_int_id``, so the engine never mistakes its new files for the old ones."""

    def __init__(self, base_names: list[str], lora_modules: list[LoRARequest]) -> None:
        self.base_names = base_names
        self.adapters: dict[str, LoRARequest] = {}
        for lora in lora_modules:
            if lora.lora_name in self.adapters or lora.lora_name in base_names:
                raise ValueError(f"--lora-modules: the name {lora.lora_name!r} is taken twice (names must be unique)")
            self.adapters[lora.lora_name] = lora
        self._ids = itertools.count(max((lora.lora_int_id for lora in lora_modules), default=0) + 1)

    @property
    def names(self) -> list[str]:
        return self.base_names + list(self.adapters)

    def resolve(self, name: str | None) -> Served:
        """The base model or the adapter ``name`` (None: the first served name); 404 for any other name."""
        if name is None or name in self.base_names:
            return Served(name or self.base_names[0])
        lora = self.adapters.get(name)
        if lora is None:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.names}", "model")
        return Served(name, lora)

    async def load(self, llm: AsyncLLM, name: str, path: str) -> None:
        """Read and check an adapter (in a worker thread: it reads files) and serve it as ``name``."""
        if name in self.names:
            raise ApiError(400, f"the name {name!r} is already served; unload it first", "lora_name")
        lora = LoRARequest(name, next(self._ids), path)
        try:
            await asyncio.to_thread(llm.engine.check_lora, lora, "lora_path")
        except ValueError as e:
            raise ApiError(400, str(e), "lora_path") from None
        if name in self.names:  # loaded by another request meanwhile
            raise ApiError(400, f"the name {name!r} is already served; unload it first", "lora_name")
        self.adapters[name] = lora

    def unload(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise ApiError(404, f"no LoRA adapter {name!r} is loaded (loaded: {list(self.adapters)})", "lora_name")

    def cards(self, created: int, max_model_len: int) -> list[dict]:
        """``/v1/models``' entries: the base names, then each adapter with its files and its parent."""
        card = {"object": "model", "created": created, "owned_by": "gpt2-triton", "max_model_len": max_model_len}
        return [{"id": name, **card} for name in self.base_names] + [
            {"id": lora.lora_name, **card, "root": lora.lora_path, "parent": self.base_names[0]}
            for lora in self.adapters.values()
        ]
