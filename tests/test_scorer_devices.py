"""The scorer's log-probabilities on a sharded model, without a GPU: PyTorch's fake tensors put
the logits on "cuda:1" and the inputs on "cuda:0" (as accelerate's device_map does), and any op
that mixes the two raises. Then the memory one pass takes beyond the logits, counted op by op on
the meta device at real sizes (a 128k vocabulary), against the documented bound and headroom."""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import peft  # noqa: F401  (imported before any fake mode: PEFT builds no tensor under one)
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from raymerge.score import logprobs
from raymerge.score.logprobs import extra_bytes_bound, token_logprobs
from raymerge.score.passes import row_logliks
from raymerge.sweep.spec.models import SweepSpec

VOCAB, HIDDEN = 300, 16
HEADROOM = int(SweepSpec.model_fields["gpu_headroom_gb"].default * 2**30)
"""The GPU memory a worker keeps free of base weights by default (gpu_headroom_gb: 2)."""


class ShardedLM(torch.nn.Module):
    """A causal LM as accelerate's device_map shards one: embeddings on cuda:0 (the device the
    scorer sends inputs to: its first parameter's), lm_head on cuda:1, hidden states moved
    between them, logits returned on cuda:1."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.zeros(VOCAB, HIDDEN, device="cuda:0"), False)
        self.head = torch.nn.Parameter(
            torch.zeros(VOCAB, HIDDEN, device="cuda:1", dtype=torch.bfloat16), False
        )
        self.hf_device_map = {"embed": "cuda:0", "head": "cuda:1"}  # as accelerate records it

    def forward(self, input_ids, attention_mask, use_cache=None, logits_to_keep=0):
        hidden = torch.nn.functional.embedding(input_ids, self.embed)  # ids must be on cuda:0
        hidden = hidden * attention_mask.unsqueeze(-1)  # and so must the mask
        hidden = hidden.to("cuda:1", torch.bfloat16)  # the last layers and norm are on cuda:1
        if isinstance(logits_to_keep, torch.Tensor):  # per-row positions, as transformers
            hidden = torch.take_along_dim(hidden, logits_to_keep.unsqueeze(-1), dim=1)
        logits = torch.nn.functional.linear(hidden, self.head)
        return SimpleNamespace(logits=logits)


class OneDeviceLM(ShardedLM):
    """The same model on one device (cuda:1): logits are computed at the positions read."""

    def __init__(self):
        super().__init__()
        self.hf_device_map = {"embed": "cuda:1", "head": "cuda:1"}
        self.embed = torch.nn.Parameter(torch.zeros(VOCAB, HIDDEN, device="cuda:1"), False)


class WholeLogitsLM(ShardedLM):
    """The sharded model with a forward that returns every position's logits."""

    def forward(self, input_ids, attention_mask, use_cache=None):
        return super().forward(input_ids, attention_mask)


def _batch(rows: int, width: int, device: str = "cpu"):
    """(input ids, attention mask, targets) as the scorer prepares them (on the CPU)."""
    input_ids = torch.zeros(rows, width, dtype=torch.long, device=device)
    mask = torch.ones(rows, width, dtype=torch.long, device=device)
    targets = torch.ones(rows, width - 1, dtype=torch.bool, device=device)
    return input_ids, mask, targets


def _full_log_softmax(logits, input_ids, targets):
    """The previous implementation: a float32 log-softmax over the whole vocabulary, gathered
    with the next tokens where the inputs were (indexing written as `narrow` so that fake
    tensors run it)."""
    width = logits.shape[1] - 1
    logprobs_ = torch.log_softmax(logits.narrow(1, 0, width).float(), dim=-1)
    following = input_ids.narrow(1, 1, width)
    picked = logprobs_.gather(-1, following.unsqueeze(-1)).squeeze(-1)
    return torch.where(targets, picked, 0.0)


@pytest.mark.parametrize("lm", [ShardedLM, WholeLogitsLM, OneDeviceLM])
def test_a_sharded_models_logits_are_scored_on_their_own_device(lm):
    """Three adapters' rows through a model whose logits come back on another device than its
    inputs went to (sharded: every position's logits, read at the scored ones, as positions
    given on the input device could not slice hidden states on the last one), or on one device
    (the scored positions only): the sums arrive on the CPU, one per adapter and sequence."""
    rows = [([1, 2, 3, 4, 5], 1), ([1, 2, 3], 2), ([7, 8, 9, 10, 11, 12], 4), ([5, 6], 1)]
    with FakeTensorMode():
        model = lm()
        sums = row_logliks(model, rows, [None, None, None], pad_id=0)
    assert sums.shape == (3, 4) and sums.dtype == torch.float64 and sums.device.type == "cpu"


def test_targets_move_to_the_logits_device():
    """Logits on cuda:1, ids and targets on cuda:0: the log-probabilities are computed on cuda:1
    (any op mixing the devices would raise), where the previous implementation's gather raised."""
    with FakeTensorMode():
        logits = torch.empty(6, 12, VOCAB, dtype=torch.bfloat16, device="cuda:1")
        input_ids, _, targets = _batch(rows=6, width=12, device="cuda:0")
        picked = token_logprobs(logits, input_ids, targets)
        assert picked.device == torch.device("cuda:1")
        assert picked.shape == (6, 11) and picked.dtype == torch.float32
        with pytest.raises(FakeTensorDeviceMismatchError):
            _full_log_softmax(logits, input_ids, targets)


@pytest.mark.parametrize("chunk_bytes", [64 * 2**20, 4 * VOCAB * 24, 4 * VOCAB * 5, 1])
def test_chunked_logsumexp_gives_the_log_softmax(monkeypatch, chunk_bytes):
    """Whole rows per chunk, several rows, part of a row, one position: the target
    log-probabilities equal log_softmax's (float64) to float32 rounding, 0 off the targets."""
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", chunk_bytes)
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 12, VOCAB, generator=generator) * 4).to(torch.bfloat16)
    input_ids = torch.randint(0, VOCAB, (5, 12), generator=generator)
    targets = torch.rand(5, 11, generator=generator) > 0.3
    full = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # float64, whole vocabulary
    expected = full.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).masked_fill(~targets, 0)
    actual = token_logprobs(logits, input_ids, targets)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=2e-5)
    assert bool((actual[~targets] == 0).all()) and bool((actual[targets] < 0).all())


class LiveBytes(TorchDispatchMode):
    """Bytes of the storage that ops run under it allocate, while alive: the peak. A storage
    is counted once (views share it) and uncounted when it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        known = {
            t.untyped_storage()._cdata
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in known or key in self._alive:
                continue  # a view, or an in-place result
            self._alive.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out

    def _freed(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size


def _peak_bytes(score, rows: int, tokens: int, vocab: int) -> int:
    """Peak bytes `score` allocates for one pass's logits (bf16, as a bf16 model returns them),
    beyond the logits, with the caller's float64 sums; shapes real, on the meta device."""
    logits = torch.empty(rows, tokens, vocab, dtype=torch.bfloat16, device="meta")
    input_ids, _, targets = _batch(rows, tokens, device="meta")
    with LiveBytes() as counter:
        score(logits, input_ids, targets).double().sum(dim=1)
    return counter.peak


@pytest.mark.parametrize("vocab", [32_000, 128_256])
@pytest.mark.parametrize("merges_per_pass", [1, 4, 16])
def test_a_pass_stays_within_the_documented_bound(vocab, merges_per_pass):
    rows, tokens = 8 * merges_per_pass, 128  # batch_size 8, max_length 128
    peak = _peak_bytes(token_logprobs, rows, tokens, vocab)
    assert logprobs.CHUNK_BYTES / 2 <= peak <= extra_bytes_bound(rows, tokens, vocab)


def test_the_128k_vocabulary_case_fits_the_default_headroom_where_a_log_softmax_did_not():
    """Batch 8 x 16 merges x 128 tokens over Llama 3's 128,256 tokens: the extra memory of a pass
    is under a quarter of gpu_headroom_gb's default (about 135 MB of 2 GiB); a float32
    log-softmax over the whole vocabulary (the previous implementation) took 16.7 GB."""
    rows, tokens, vocab = 8 * 16, 128, 128_256
    assert _peak_bytes(token_logprobs, rows, tokens, vocab) < HEADROOM / 4
    assert _peak_bytes(_full_log_softmax, rows, tokens, vocab) > 4 * HEADROOM
