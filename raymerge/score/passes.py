"""The model's scoring passes: K merges per pass (PEFT's mixed-adapter batch, one adapter name
per row, adapter by adapter), logits only at the positions read.

- `row_logliks`: rows scored whole (text windows; choice rows where a row cannot hold a
  context and its choices, `shares_contexts`), logits at each row's scored positions only.
- `choice_logliks`: each context once per merge, its choices after it in the same row, each
  attending to the context's keys and values and its own tokens (a per-row mask); the logits
  at the context's last position give every choice's first token.

The output layer sees only the positions kept (`logits_to_keep` as per-row positions, so dim 0
keeps one row per adapter name); a model whose forward lacks it returns every position's logits
and they are read the same way. Inputs go to the device of the model's first parameter; logits
are scored wherever the model leaves them (`logprobs`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from raymerge.score.logprobs import chunked_logsumexp, picked_logprobs
from raymerge.score.plan import ChoicePlan, PromptBatch, Row

BASE = "__base__"
"""PEFT's adapter name for rows of the base model alone, in a mixed-adapter batch."""


def adapter_rows(names: list[str | None], rows: int) -> list[str]:
    """adapter_names for `rows` examples repeated once per adapter, adapter by adapter."""
    return [BASE if name is None else name for name in names for _ in range(rows)]


def routing(model, names: list[str | None], rows: int) -> dict[str, Any]:
    """How a batch reaches its adapters: PEFT's mixed-adapter batch (`adapter_names`, one per
    row), or for one adapter alone its plain forward where that computes the very same sums.

    PEFT's plain forward adds an adapter's output to the base layer's and rounds the sum to the
    base dtype once; the mixed batch rounds the adapter's output to the base dtype first. The
    two agree to the last bit when the adapter's dtype promotes into the base's (float16 or
    bfloat16 into float32; like into like): then the plain forward, which copies no rows, runs
    one merge. Otherwise (float32 adapters on a bfloat16 base) one merge goes through the mixed
    batch too, so that K merges per pass score exactly as one at a time."""
    if not _is_peft(model):
        return {}
    if len(names) == 1 and names[0] is not None and _plain_is_exact(model, names[0]):
        return {}
    return {"adapter_names": adapter_rows(names, rows)}


def _plain_is_exact(model, name: str) -> bool:
    """Whether `name` is the active adapter and each of its LoRA layers' dtype promotes into
    its base layer's (and none is a variant, such as DoRA, that the mixed batch lacks)."""
    from peft.tuners.lora import LoraLayer

    if model.active_adapter != name:
        return False
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        if name in getattr(module, "lora_variant", {}):
            return False
        factors = module.lora_A if name in module.lora_A else module.lora_embedding_A
        if name not in factors:
            continue
        factor = factors[name]
        dtype = factor.weight.dtype if hasattr(factor, "weight") else factor.dtype
        base = module.get_base_layer().weight.dtype
        if torch.promote_types(base, dtype) != base:
            return False
    return True


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _inner(model):
    return model.get_base_model() if _is_peft(model) else model


@functools.cache
def _parameters_of(forward) -> frozenset[str]:
    return frozenset(inspect.signature(forward).parameters)


def keeps_some_logits(model) -> bool:
    """Whether the model's forward computes logits at given positions only, and the positions
    can be given on its input device: transformers slices the last hidden states with them,
    and on a model sharded over several devices (accelerate's `hf_device_map`) those are on
    another device than the inputs. A sharded model returns every position's logits, read at
    the same positions."""
    inner = _inner(model)
    devices = set((getattr(inner, "hf_device_map", None) or {}).values())
    return len(devices) <= 1 and "logits_to_keep" in _parameters_of(type(inner).forward)


def shares_contexts(model) -> bool:
    """Whether a row can hold a context and its choices: the model takes position ids and a
    4-D attention mask as given (transformers' eager and SDPA attention, no sliding window,
    which such a mask would override, positions from `position_ids`, not ALiBi's from the mask).
    Other models (flash attention, sliding windows, ALiBi) score choices as whole rows."""
    inner = _inner(model)
    config = getattr(inner, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa") or _windowed(config):
        return False
    if getattr(config, "alibi", False):  # ALiBi takes distances from the mask, not positions
        return False
    return "position_ids" in _parameters_of(type(inner).forward)


def _windowed(config) -> bool:
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None) and getattr(
        config, "use_sliding_window", True
    )
    return bool(sliding) or any(kind != "full_attention" for kind in layer_types)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _padded(sequences: list, pad_id: int, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (to `width` at least) and their attention mask (the harness's layout:
    positions 0..n-1)."""
    width = max(width, *(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask


def _kept_logits(model, kept: torch.Tensor, **inputs) -> torch.Tensor:
    """The logits at positions `kept` ([rows, S], on the CPU) of each row: only those computed
    where the model can (`keeps_some_logits`), else all of them computed and those read."""
    if keeps_some_logits(model):
        return model(logits_to_keep=kept.to(_device(model)), **inputs).logits
    logits = model(**inputs).logits
    index = kept.to(logits.device).unsqueeze(-1)
    return logits.gather(1, index.expand(-1, -1, logits.shape[-1]))


@torch.inference_mode()
def row_logliks(
    model, rows: list[Row], names: list[str | None], pad_id: int, width: int = 0
) -> torch.Tensor:
    """Summed log-probabilities of each row's scored tokens (each given what precedes it), for
    every adapter in one pass (`width`: the pass's padded width, at least): [adapter, row],
    float64, on the CPU."""
    k, count = len(names), len(rows)
    ids, mask = _padded([r[:-1] for r, _ in rows], pad_id, width)  # the last predicts nothing
    # The positions whose logits predict a scored token, padded by repeating the last one.
    spans = [list(range(first - 1, len(r) - 1)) for r, first in rows]
    width = max(1, max(map(len, spans)))
    positions = torch.zeros(count, width, dtype=torch.long)
    scored = torch.zeros(count, width, dtype=torch.bool)
    for row, span in enumerate(spans):
        if span:
            positions[row] = torch.tensor(span + [span[-1]] * (width - len(span)))
            scored[row, : len(span)] = True
    following = _padded([r for r, _ in rows], pad_id, width + 1)[0].gather(1, positions + 1)
    device = _device(model)
    logits = _kept_logits(
        model,
        positions.repeat(k, 1),
        input_ids=ids.repeat(k, 1).to(device),
        attention_mask=mask.repeat(k, 1).to(device),
        use_cache=False,
        **routing(model, names, count),
    )
    picked = picked_logprobs(logits, following.repeat(k, 1), scored.repeat(k, 1))
    return picked.double().sum(dim=1).cpu().view(k, count)


@torch.inference_mode()
def choice_logliks(
    model, plan: ChoicePlan, batch: PromptBatch, names: list[str | None], pad_id: int, width=0
) -> torch.Tensor:
    """The summed log-probability of each member of `batch` (its continuation given its
    context), per adapter (`width`: the pass's padded width, at least): [adapter, member],
    float64, on the CPU.

    One pass: each row is a context followed by its choices' tokens (all but each one's last),
    every choice at the positions that follow the context and attending to the context's keys
    and values and to its own earlier tokens only (a mask per row). The context is computed once
    for all its choices; its last position's logits give every choice's first token."""
    k, groups = len(names), len(batch.groups)
    layout = _choice_rows(plan, batch)
    ids, positions, segments = (_padded(part, fill, width)[0] for part, fill in
                                zip(layout.rows, (pad_id, 0, _PAD), strict=True))  # fmt: skip
    device = _device(model)
    mask = _tree_mask(segments, _mask_dtype(model))
    kept, following, scored = (_padded(part, 0)[0] for part in (layout.kept, layout.following,
                                                                 layout.scored))  # fmt: skip
    logits = _kept_logits(
        model,
        kept.repeat(k, 1),
        input_ids=ids.repeat(k, 1).to(device),
        attention_mask=mask.repeat(k, 1, 1, 1).to(device),
        position_ids=positions.repeat(k, 1).to(device),
        use_cache=False,
        **routing(model, names, groups),
    )
    lse = chunked_logsumexp(logits)
    # Each member's first token, from its context's last position (slot 0 of its row).
    members = len(batch.members)
    row = torch.tensor([position for _, position in batch.members], dtype=torch.long)
    source = (torch.arange(k)[:, None] * groups + row).reshape(-1).to(logits.device)
    first_ids = torch.tensor([plan.continuations[u][0] for u, _ in batch.members])
    first = logits.narrow(1, 0, 1).squeeze(1).index_select(0, source)
    first = first.gather(-1, first_ids.repeat(k).to(logits.device).unsqueeze(-1)).squeeze(-1)
    first = first.float() - lse.narrow(1, 0, 1).squeeze(1).index_select(0, source)
    # The later tokens, each at its own slot.
    picked = logits.gather(-1, following.repeat(k, 1).to(logits.device).unsqueeze(-1))
    picked = torch.where(scored.bool().repeat(k, 1).to(logits.device),
                         picked.squeeze(-1).float() - lse, 0.0)  # fmt: skip
    slots, in_member = _padded(layout.slots, 0)
    later = picked.index_select(0, source).gather(1, slots.repeat(k, 1).to(logits.device))
    later = torch.where(in_member.bool().repeat(k, 1).to(logits.device), later, 0.0)
    values = torch.cat([first.unsqueeze(1), later], dim=1).cpu()
    return values.double().sum(dim=1).view(k, members)


_PAD = -2
"""The segment of padding (-1: the context; 0, 1, ...: the choices of a row)."""


@dataclass(frozen=True)
class _ChoiceRows:
    """Per row (a context and its choices): token ids, position ids, segments, the slots kept
    (row indices whose logits are read: the context's last, then every choice token's), the
    token each kept slot predicts and whether it is scored (slot 0 is scored per member);
    per member, its slots among the kept ones (its second token onwards)."""

    rows: tuple[list[list[int]], list[list[int]], list[list[int]]]
    kept: list[list[int]]
    following: list[list[int]]
    scored: list[list[int]]
    slots: list[list[int]]


def _choice_rows(plan: ChoicePlan, batch: PromptBatch) -> _ChoiceRows:
    ids, positions, segments, kept, following, scored = [], [], [], [], [], []
    slots: list[list[int]] = [[] for _ in batch.members]
    by_row: list[list[int]] = [[] for _ in batch.groups]
    for m, (_, row) in enumerate(batch.members):
        by_row[row].append(m)
    for row, g in enumerate(batch.groups):
        context = list(plan.contexts[g])
        length = len(context)
        tokens, where, segment = list(context), list(range(length)), [-1] * length
        keep, next_ids, read = [length - 1], [0], [0]
        for m in by_row[row]:
            continuation = plan.continuations[batch.members[m][0]]
            for i, token in enumerate(continuation[:-1]):
                slots[m].append(len(keep))
                keep.append(len(tokens))
                next_ids.append(continuation[i + 1])
                read.append(1)
                tokens.append(token)
                where.append(length + i)
                segment.append(m)
        ids.append(tokens)
        positions.append(where)
        segments.append(segment)
        kept.append(keep)
        following.append(next_ids)
        scored.append(read)
    return _ChoiceRows((ids, positions, segments), kept, following, scored, slots)


def _mask_dtype(model) -> torch.dtype:
    """What transformers' own masks are for the model's attention: boolean for SDPA (any query
    dtype), additive in the hidden states' dtype (the input embeddings') for eager."""
    inner = _inner(model)
    if getattr(inner.config, "_attn_implementation", None) == "sdpa":
        return torch.bool
    return inner.get_input_embeddings().weight.dtype


def _tree_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, T, T] mask: a token attends to the tokens before it in its row that are its
    context's or its own choice's; padding to itself only. Boolean (True: attends) or additive
    (0 or the dtype's lowest value), as `dtype` says."""
    count, width = segments.shape
    index = torch.arange(width)
    before = index[None, :] <= index[:, None]
    same = (segments[:, None, :] == -1) | (segments[:, None, :] == segments[:, :, None])
    allowed = before[None] & same & (segments[:, :, None] != _PAD)
    allowed |= torch.eye(width, dtype=torch.bool)[None]
    if dtype == torch.bool:
        return allowed[:, None]
    mask = torch.zeros(count, 1, width, width, dtype=dtype)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)
