"""Adapters held in the PeftModel for scoring, each in the dtype of the tensors it was saved as.

PEFT holds the adapters it injects or loads in float32 on a bfloat16/float16 base
(`autocast_adapter_dtype`, on by default: `get_peft_model`, `add_adapter`, `load_adapter` in PEFT
0.21), whatever dtype their tensors were saved in. Scoring instead holds every adapter exactly as
its tensors were written: a merge as the bytes raymerge writes (`output_dtype`), a reference as
its own file. Every merge is then scored at the precision of its files, and with one forward
path for every pass (see `passes.routing`) K merges per pass score exactly as one at a time.
"""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from raymerge.merge.format import config_bytes, parameter_name, parse_config, parse_lora_key
from raymerge.merge.tensors import MergedAdapter


def hold_as_saved(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    """Each parameter (by saved key) in its saved tensor's dtype, its values kept."""
    for key, tensor in state.items():
        param = params[key]
        if param.dtype != tensor.dtype:
            param.data = param.data.to(tensor.dtype)


def adapter_parameters(peft, name: str, keys) -> dict[str, torch.nn.Parameter]:
    """Where each saved LoRA key's tensor lives in adapter `name` of the PeftModel."""
    params = dict(peft.named_parameters())
    return {key: params[parameter_name(key, name)] for key in keys}


def load_reference(base, folder: Path | str, name: str) -> None:
    """Load an input adapter's folder (PEFT's own load) as `name`, holding its file's tensors
    exactly, in the file's dtype."""
    from peft.utils import load_peft_weights

    base.load_adapter(folder, name)
    state = {
        key: tensor
        for key, tensor in load_peft_weights(str(folder), device="cpu").items()
        if parse_lora_key(key) is not None
    }
    params = adapter_parameters(base.peft, name, state)
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].data = tensor.to(params[key].device)


class Slots:
    """Adapters injected into the PeftModel once and refilled with each merge's tensors: PEFT's
    injection (new modules, initialised, for every target) costs far more than copying the
    factors in. A slot is reused only for a merge of the same config and tensor shapes and
    dtypes, so filling it gives exactly what loading the merge's files afresh gives."""

    def __init__(self, base, capacity: int):
        self.base = base
        self.capacity = capacity
        self._free: dict[tuple, list[str]] = {}
        self._signature: dict[str, tuple] = {}
        self._params: dict[str, dict[str, Any]] = {}  # slot -> saved key -> its parameter
        self._names = itertools.count()

    def load(self, merged: MergedAdapter) -> str:
        from peft import PeftConfig

        raw = parse_config(config_bytes(merged.config))  # the config as its file gives it
        state = merged.tensors
        signature = (
            json.dumps(raw, sort_keys=True),
            tuple(sorted((key, tuple(t.shape), str(t.dtype)) for key, t in state.items())),
        )
        free = self._free.setdefault(signature, [])
        if free:
            name = free.pop()
        else:
            self._make_room()
            name = f"slot_{next(self._names)}"
            config = PeftConfig.from_peft_type(**raw)
            config.inference_mode = True
            self.base.add_adapter(name, config)
            self._params[name] = adapter_parameters(self.base.peft, name, state)
            hold_as_saved(self._params[name], state)
            self.base.load_weights(name, dict(state))  # PEFT's own load, checked, the first time
            self._signature[name] = signature
            return name
        with torch.no_grad():
            for key, tensor in state.items():
                self._params[name][key].copy_(tensor)
        return name

    def release(self, names: list[str]) -> None:
        for name in names:
            self._free[self._signature[name]].append(name)

    def _make_room(self) -> None:
        """Drop free slots beyond the capacity (memory must not grow with the sweep)."""
        while len(self._signature) >= self.capacity:
            signature = next((s for s, names in self._free.items() if names), None)
            if signature is None:
                return
            name = self._free[signature].pop()
            del self._signature[name], self._params[name]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Adapter .* was active")
                self.base.peft.delete_adapter(name)
