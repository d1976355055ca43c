"""LoRA adapters (Hu et al. 2021) served over one base model, several in the same batch: vLLM's ``enable_lora``.

An adapter is a PEFT checkpoint (``adapter_config.json`` + ``adapter_model.safetensors``, what ``peft``'s
``save_pretrained`` writes) of low-rank updates to GPT-2's block linears (``c_attn``, ``c_proj``, ``c_fc``): each
``y = W x + bias`` becomes ``y = W x + bias + s B A x``, with ``A [r, in]``, ``B [out, r]`` and ``s = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA).

The engine keeps up to ``max_loras`` adapters on the device, each in a slot of stacked tensors per layer and
linear (:class:`LoRASlots`): ``a [S, R, K]`` and ``b [N, S * R]``, the rank padded with zeros to ``R``
(``max_lora_rank`` rounded up to a multiple of 16, so that the expand's K is one too) and the scale folded into
``b``. Every row of a step names its slot (-1: the base model alone), so one step mixes adapters and the base model:
    u = lora_shrink(x, a, slots)    # [M, S * R]: row m's x @ a[slot].T in its slot's columns, zeros elsewhere
    y = W x + bias + u @ b.T         # the expand is one dense GEMM over all slots: the zeros select
No shape depends on which adapters a step uses, so a decode step with adapters is still one CUDA graph.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
RANK_MULTIPLE = 16  # the slots' rank is padded to a multiple of this: tl.dot's smallest K
WEIGHTS_FILE = "adapter_model.safetensors"

# PEFT's names of GPT-2's block linears (GPT2Block's attn.c_attn ...), in the order of weights.LINEAR_FIELDS
MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# base_model.model.transformer.h.3.mlp.c_fc.lora_B.weight (an adapter name may sit before .weight)
_KEY = re.compile(rf"(?:.*\.)?h\.(\d+)\.({'|'.join(map(re.escape, MODULES))})\.lora_([AB])(?:\.\w+)?\.weight")

# adapter_config.json fields whose non-default values change the math in ways not served here
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora=true)",
    "modules_to_save": "whole trained modules (modules_to_save)",
    "layer_replication": "layer replication",
    "lora_bias": "trained LoRA biases (lora_bias=true)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter a request runs with (vLLM's ``LoRARequest``): ``lora_int_id`` (>= 1) identifies it in the
    engine, its slots and its prefix cache; ``lora_path`` is the PEFT checkpoint directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        object.__setattr__(self, "lora_path", str(self.lora_path))


@dataclass
class LoRAAdapter:
    """One adapter's weights on the host, fp32: ``a[layer][module]`` ``[r, K]`` and ``b[layer][module]`` ``[N, r]``
    already times the scale; None where the adapter leaves that linear alone."""

    rank: int  # the largest of its modules' ranks
    a: list[list[torch.Tensor | None]]
    b: list[list[torch.Tensor | None]]


def _linear_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """``(N, K)`` of each block linear, in MODULES order."""
    d, f = config.n_embd, config.d_ff
    return [(3 * d, d), (d, d), (f, d), (d, f)]


def _alpha(adapter_config: dict, layer: int, module: str) -> float:
    """The module's alpha: PEFT's ``alpha_pattern`` (a key matching the end of its name) or ``lora_alpha``."""
    name = f"transformer.h.{layer}.{module}"
    for key, alpha in adapter_config["alpha_pattern"].items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(alpha)
    return float(adapter_config["lora_alpha"])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_numbers(adapter_config: dict, file: Path) -> None:
    """The fields the math reads hold what PEFT writes there (a hand-edited config must fail here, not mid-load);
    fills in PEFT's defaults."""
    adapter_config.setdefault("r", 8)
    adapter_config.setdefault("lora_alpha", 8)
    for field in ("alpha_pattern", "rank_pattern"):
        adapter_config[field] = adapter_config.get(field) or {}
        if not isinstance(adapter_config[field], dict):
            raise ValueError(f"{file}: {field} must be a JSON object, got {adapter_config[field]!r}")
    ranks = [adapter_config["r"], *adapter_config["rank_pattern"].values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise ValueError(f"{file}: ranks (r, rank_pattern) must be positive integers, got {ranks}")
    alphas = [adapter_config["lora_alpha"], *adapter_config["alpha_pattern"].values()]
    if not all(map(_is_number, alphas)):
        raise ValueError(f"{file}: alphas (lora_alpha, alpha_pattern) must be numbers, got {alphas}")
    for key in adapter_config["alpha_pattern"]:
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{file}: alpha_pattern key {key!r} is not a regular expression ({e})") from None


def _read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"LoRA adapter {path} has no {CONFIG_FILE} (save it with peft's save_pretrained)")
    try:
        adapter_config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"LoRA adapter {file} is not readable JSON: {e}") from None
    if not isinstance(adapter_config, dict):
        raise ValueError(f"LoRA adapter {file} holds a JSON {type(adapter_config).__name__}, not an object")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {adapter_config['peft_type']!r} is not LORA")
    if adapter_config.get("bias", "none") != "none":
        raise ValueError(f"{file}: trained biases (bias={adapter_config['bias']!r}) are not supported; use 'none'")
    for field, what in _UNSUPPORTED.items():
        if adapter_config.get(field):
            raise ValueError(f"{file}: {what} is not supported by the LoRA kernels")
    _check_numbers(adapter_config, file)
    return adapter_config


def adapter_rank(path: str | Path) -> int:
    """The largest rank an adapter's config declares (``r``, ``rank_pattern``): the ``max_lora_rank`` it needs."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"LoRA adapter directory {path} does not exist")
    adapter_config = _read_config(path)
    return max([adapter_config["r"], *adapter_config["rank_pattern"].values()])


def load_adapter(path: str | Path, config: ModelConfig) -> LoRAAdapter:
    """Read and check a PEFT LoRA checkpoint for GPT-2 ``config``; ``ValueError`` naming what does not fit."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"LoRA adapter directory {path} does not exist")
    adapter_config = _read_config(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"LoRA adapter {path} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(path / WEIGHTS_FILE)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error type for a damaged file)
        raise ValueError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {e}") from None
    L, shapes = config.n_layer, _linear_shapes(config)
    found: dict[tuple[int, int, str], torch.Tensor] = {}
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{path / WEIGHTS_FILE}: {key} is not a LoRA weight of GPT-2's c_attn, c_proj or c_fc")
        layer, module, which = int(match[1]), MODULES.index(match[2]), match[3]
        if layer >= L:
            raise ValueError(f"{path / WEIGHTS_FILE}: {key} is for layer {layer}, the model has {L}")
        found[layer, module, which] = value.float()
    a = [[None] * len(MODULES) for _ in range(L)]
    b = [[None] * len(MODULES) for _ in range(L)]
    rank = 0
    for (layer, module, which), A in found.items():
        if which != "A":
            continue
        B = found.get((layer, module, "B"))
        if B is None:
            raise ValueError(f"{path / WEIGHTS_FILE}: layer {layer} {MODULES[module]} has lora_A but no lora_B")
        (n, k), r = shapes[module], A.shape[0]
        if A.shape != (r, k) or B.shape != (n, r):
            raise ValueError(
                f"{path / WEIGHTS_FILE}: layer {layer} {MODULES[module]} has lora_A {tuple(A.shape)} and lora_B "
                f"{tuple(B.shape)}; this model needs [r, {k}] and [{n}, r]"
            )
        alpha = _alpha(adapter_config, layer, MODULES[module])
        scale = alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r
        a[layer][module], b[layer][module] = A, B * scale
        rank = max(rank, r)
    if rank == 0:
        raise ValueError(f"{path / WEIGHTS_FILE} holds no lora_A/lora_B weights")
    return LoRAAdapter(rank, a, b)


def save_random_adapter(
    directory: str | Path, config: ModelConfig, rank: int = 16, std: float = 0.02, seed: int | None = None
) -> Path:
    """A PEFT LoRA adapter of every block linear with N(0, std) weights, written as PEFT writes one: for benchmarks
    and tests without trained adapters (or peft), as ``load_format="dummy"`` is for the model's weights."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    tensors = {}
    for layer in range(config.n_layer):
        for module, (n, k) in zip(MODULES, _linear_shapes(config)):
            key = f"base_model.model.transformer.h.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, k, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(n, rank, generator=gen) * std
    save_file(tensors, str(directory / WEIGHTS_FILE))
    peft_config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["c_attn", "c_proj", "c_fc"],
                   "fan_in_fan_out": True, "bias": "none", "base_model_name_or_path": None}  # fmt: skip
    (directory / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
    return directory


class LoRASlots:
    """The adapters on the device: ``max_loras`` slots of stacked tensors per layer and linear, as the model reads
    them (``stacks[layer][module] = (a [S, R, K], b [N, S * R])``), and which adapter holds each slot.

    Adapters are read from disk once and kept on the host (the ``max_cpu_loras`` used last); a step asks for its
    adapters' slots with :meth:`activate`, which copies in those not on the device, over the slots used longest ago.
    The copies are in place: a captured CUDA graph reads the new weights. :meth:`check` may run in another thread
    than the steps (the server validates requests as they arrive): the host cache is shared under a lock.
    """

    def __init__(
        self,
        config: ModelConfig,
        max_loras: int,
        max_lora_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        max_cpu_loras: int | None = None,
    ) -> None:
        self.config = config
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        S, R = max_loras, -(-max_lora_rank // RANK_MULTIPLE) * RANK_MULTIPLE
        self.padded_rank = R
        self.stacks = [
            [
                (torch.zeros(S, R, k, dtype=dtype, device=device), torch.zeros(n, S * R, dtype=dtype, device=device))
                for n, k in _linear_shapes(config)
            ]
            for _ in range(config.n_layer)
        ]
        self.slot_ids: list[int | None] = [None] * S  # lora_int_id in each slot
        self._slot_order: OrderedDict[int, None] = OrderedDict((s, None) for s in range(S))  # least recent first
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # by lora_int_id, least recent first
        self._requests: dict[int, LoRARequest] = {}  # the request each known id was first seen with
        self._lock = threading.Lock()

    def check(self, request: LoRARequest) -> None:
        """Load ``request``'s adapter to the host if it is not there (``ValueError`` if it cannot be served), and
        refuse an id already known under another name or path."""
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        with self._lock:
            known = self._requests.get(request.lora_int_id)
        if known is not None and (known.lora_name, known.lora_path) != (request.lora_name, request.lora_path):
            raise ValueError(
                f"lora_int_id {request.lora_int_id} is already adapter {known.lora_name!r} at {known.lora_path}"
            )
        self._adapter(request)
        with self._lock:
            self._requests.setdefault(request.lora_int_id, request)

    def _adapter(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter from the host cache, or read from disk (outside the lock: a step need not wait for it)."""
        with self._lock:
            adapter = self._host.get(request.lora_int_id)
            if adapter is not None:
                self._host.move_to_end(request.lora_int_id)
                return adapter
        adapter = load_adapter(request.lora_path, self.config)
        if adapter.rank > self.max_lora_rank:
            raise ValueError(
                f"LoRA adapter {request.lora_name!r} has rank {adapter.rank}, above max_lora_rank={self.max_lora_rank}"
            )
        with self._lock:
            self._host[request.lora_int_id] = adapter
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)
        return adapter

    def activate(self, requests: list[LoRARequest]) -> dict[int, int]:
        """The slot of each of a step's adapters (at most ``max_loras`` distinct ones), by ``lora_int_id``; those not
        on the device are copied in over slots the step does not use."""
        wanted = {r.lora_int_id: r for r in requests}
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a step uses {len(wanted)} LoRA adapters, above max_loras={self.max_loras}")
        where = {lora_id: s for s, lora_id in enumerate(self.slot_ids) if lora_id in wanted}
        free = [s for s in self._slot_order if self.slot_ids[s] not in wanted]
        for lora_id, request in wanted.items():
            if lora_id not in where:
                where[lora_id] = slot = free.pop(0)
                self._copy_in(slot, self._adapter(request))
                self.slot_ids[slot] = lora_id
            self._slot_order.move_to_end(where[lora_id])
        return where

    def _copy_in(self, slot: int, adapter: LoRAAdapter) -> None:
        R = self.padded_rank
        for layer, stacks in enumerate(self.stacks):
            for module, (a, b) in enumerate(stacks):
                a[slot].zero_()
                b[:, slot * R : (slot + 1) * R].zero_()
                A, B = adapter.a[layer][module], adapter.b[layer][module]
                if A is not None:
                    r = A.shape[0]
                    a[slot, :r].copy_(A)
                    b[:, slot * R : slot * R + r].copy_(B)
