"""Target log-probabilities from a pass's logits: on the logits' own device, in bounded memory.

A sharded model (accelerate's device_map) can return its logits on the device of `lm_head`
rather than the one its inputs were sent to (whether a hook moves them back depends on how it was
dispatched): the targets and masks are moved to the logits, never the other way round. The whole
vocabulary is never turned into a float32 log-softmax: the target logits are gathered, and a
logsumexp over the vocabulary, computed chunk by chunk in float32, is subtracted.

Memory: for a pass of N = batch x K merges rows of T tokens over a vocabulary of V, beyond the
logits the model returns (N x T x V in the model's dtype), this needs at most
`extra_bytes_bound(N, T, V)` = 2 x max(CHUNK_BYTES, 4 V) + 48 N T bytes: a chunk's float32 copy
and its shifted exponentials, plus a few float32/float64 numbers per token. At batch 8 x 16
merges x 128 tokens and V = 128,256 that is 135 MB (a float32 log-softmax takes 8.3 GB).

Only torch functions are used on device tensors (`narrow`, `split`, `torch.where`, ...), not
Python's indexing or `~`: PyTorch's fake tensors run them on devices such as "cuda:1" on a
CPU-only build, which is how the device logic is tested without a GPU.

Example:
    >>> import torch
    >>> logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    >>> ids = torch.tensor([[0, 0, 1]])
    >>> targets = torch.tensor([[True, False]])
    >>> token_logprobs(logits, ids, targets).tolist()  # log(1/2) at the target, 0 elsewhere
    [[-0.6931471824645996, 0.0]]
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 64 * 2**20
"""Float32 bytes of logits normalised at a time (a chunk of positions, each V float32 values)."""
BYTES_PER_TOKEN = 48
"""What the small per-position tensors of a pass take, at most, per target position: the
gathered target logit (float32 and the logits' dtype), the logsumexp, their difference, the
masked result in float32 and float64, the next token id (int64) and the mask."""


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor):
    """Log-probability of each next token under `logits`, 0 where `targets` is False.

    logits: [N, T, V] (any dtype, any device); input_ids: [N, T]; targets: [N, T - 1] bool,
    both on any device. Returns [N, T - 1] float32 on the logits' device.
    """
    width = logits.shape[1] - 1
    # logits at p predict token p + 1
    return picked_logprobs(logits.narrow(1, 0, width), input_ids.narrow(1, 1, width), targets)


def picked_logprobs(logits: torch.Tensor, following: torch.Tensor, scored: torch.Tensor | None):
    """Log-probability of `following` under `logits`, position by position, 0 where `scored` is
    False (None: everywhere scored).

    logits: [N, S, V] (any dtype, any device); following: [N, S] token ids, scored: [N, S] bool,
    both on any device. Returns [N, S] float32 on the logits' device.
    """
    device = logits.device
    picked = logits.gather(-1, following.to(device).unsqueeze(-1)).squeeze(-1).float()
    values = picked - chunked_logsumexp(logits)
    return values if scored is None else torch.where(scored.to(device), values, 0.0)


def chunked_logsumexp(scores: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension of [N, T, V], in float32, `CHUNK_BYTES` at a time."""
    _, width, vocab = scores.shape
    positions = max(1, CHUNK_BYTES // (4 * vocab))  # positions per chunk
    rows_per_chunk = max(1, positions // max(width, 1))
    width_per_chunk = max(1, min(width, positions))
    return torch.cat(
        [
            torch.cat([_logsumexp(block) for block in band.split(width_per_chunk, dim=1)], dim=1)
            for band in scores.split(rows_per_chunk, dim=0)
        ],
        dim=0,
    )


def _logsumexp(block: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp's arithmetic, with each temporary made here (so that it is counted):
    the float32 copy (none for float32 logits) and one shifted, exponentiated copy."""
    values = block.float()
    top = values.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isinf(top), 0.0, top)  # rows of -inf (or inf) as torch does
    shifted = values - top
    shifted.exp_()
    return shifted.sum(dim=-1).log_().add_(top.squeeze(-1))


def extra_bytes_bound(rows: int, tokens: int, vocab: int) -> int:
    """The most `token_logprobs` allocates for a pass of `rows` sequences of `tokens` tokens
    (rows = batch_size x merges per pass), beyond the logits themselves."""
    return 2 * max(CHUNK_BYTES, 4 * vocab) + BYTES_PER_TOKEN * rows * tokens
