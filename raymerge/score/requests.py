"""How examples become scored token rows, by lm-evaluation-harness's conventions (0.4.x,
`lm_eval.models.huggingface.HFLM` and `lm_eval.api.task`), so that a score here is the one the
harness computes for the same model, tokenizer and data.

- Token ids are the tokenizer's own encoding with its default special tokens (`tok_encode`): a
  Llama tokenizer's BOS is there, GPT-2's byte-level one adds none; a text that starts with the
  prefix token's own text gets no second one.
- **choice** (`output_type: multiple_choice`): the context is the prompt, each continuation is
  `target_delimiter + choice` (default " "); white space at the end of the prompt moves to the
  front of the continuation (`_encode_pair`), and the continuation's tokens are those of
  `context + continuation` after the context's; an empty prompt is the prefix token before the
  continuation's tokens without special tokens (`loglikelihood`). The row keeps the last
  `max_length + 1` tokens.
- **text** (`output_type: loglikelihood_rolling`): every token is scored, the first given the
  prefix token (BOS, else EOS), in windows of `max_length` predicted tokens, each later window
  conditioned on the `max_length + 1 - n` tokens before its n predictions
  (`get_rolling_token_windows` with `context_len=1`, then `make_disjoint_window`).

A row is (token ids, index of the first scored token): every later token is scored.

Example:
    >>> rolling_rows([5, 6, 7, 8, 9], prefix=1, width=3)
    [([1, 5, 6, 7], 1), ([6, 7, 8, 9], 2)]
"""

from __future__ import annotations

from collections.abc import Callable

Encode = Callable[[str], list[int]]


def prefix_token_id(tokenizer) -> int:
    """The harness's prefix token: BOS, else EOS (then the pad token, else 0, for a tokenizer
    with neither)."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if token is not None:
            return token
    return 0


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """The context's trailing white space moved to the front of the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        return context[:-spaces], context[-spaces:] + continuation
    return context, continuation


def choice_row(
    encode: Encode, bare: Encode, prefix: int, prompt: str, continuation: str, width: int
) -> tuple[list[int], int]:
    """One (prompt, continuation) pair as a row scoring the continuation's tokens (`encode`:
    the tokenizer's default special tokens; `bare`: none)."""
    if not prompt:  # the harness's own case: the prefix token, then the bare continuation
        scored = bare(continuation)
        context_ids = [prefix]
        if scored[:1] == [prefix]:
            context_ids, scored = scored[:1], scored[1:]
    else:
        context, continuation = split_pair(prompt, continuation)
        context_ids = encode(context) or [prefix]
        scored = encode(context + continuation)[len(encode(context)) :]
    row = (context_ids + scored)[-(width + 1) :]
    return row, max(len(row) - len(scored), 1)


def rolling_rows(tokens: list[int], prefix: int, width: int) -> list[tuple[list[int], int]]:
    """A document's tokens as rows that score each token once, `width` at most per row."""
    if not tokens:
        return []
    rows = [([prefix, *tokens[:width]], 1)]
    done = min(width, len(tokens))
    while done < len(tokens):
        end = min(done + width, len(tokens))
        predicted = end - done
        rows.append((tokens[max(0, end - width - 1) : end], width + 1 - predicted))
        done = end
    return rows
