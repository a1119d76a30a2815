"""A tiny world with a real subword tokenizer, for checking scores against lm-evaluation-harness.

The demo world's tokenizer has one token per byte, so that " cat" and "cat" differ only by one
byte token and the harness's conventions (the delimiter before a choice, the prompt's trailing
white space moved into the continuation, the prefix token of a rolling window) hardly show.
Here a byte-level BPE tokenizer is trained on a small fixed corpus (in well under a second):
"Ġcat" is one token, "cat" is two, and a choice's tokens depend on what precedes it. It adds
BOS to every text by default (as Llama's tokenizers do), so that the tokenizer's default
special tokens matter too.

Usage::

    world = build_bpe_world(tmp_path, ("a", "b", "c"))
    world.base, world.adapters["a"], world.choice_path, world.text_path
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from raymerge.demo.world import AdapterShape, build_adapter

WORDS = (
    *("the", "a", "one", "big", "small", "red", "blue", "green", "old", "young"),
    *("cat", "dog", "bird", "fish", "cow", "horse", "sheep", "goat"),
    *("is", "was", "sat", "ran", "saw", "ate", "on", "in", "by", "and", "of", "near", "under"),
)
"""The corpus's words: each becomes a leading-space token ("Ġcat") once trained."""
RARE = ("zebra", "quokka", "axolotl", "narwhal", "okapi")
"""Choices the corpus never saw: several tokens each, so that choice lengths differ."""
SPECIAL = ("<s>", "</s>", "<pad>")
VOCAB_SIZE = 400


@dataclass(frozen=True)
class BpeWorld:
    base: Path
    adapters: dict[str, Path]
    choice_path: Path
    text_path: Path


def build_tokenizer(path: Path) -> Path:
    """Train a byte-level BPE tokenizer (BOS added by default) and save it to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(400)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(path)
    return path


def build_base_model(path: Path, vocab_size: int, *, seed: int = 0) -> Path:
    """A random Llama-architecture model, initialised wide enough (initializer_range 0.3) that
    its next-token distributions are far from uniform and choices differ in log-likelihood."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def choice_examples(seed: int = 0, count: int = 24) -> list[dict]:
    """Multiple-choice items over the corpus's words: prompts ending in a word, a space or a
    newline, a few longer than any small max_length; choices of one to several tokens."""
    rng = random.Random(seed)
    endings = ("", "", " ", "\n", ":", " \n")
    items = []
    for i in range(count):
        words = 18 if i % 6 == 5 else rng.randint(2, 6)  # every sixth: longer than 16 tokens
        prompt = " ".join(rng.choice(WORDS) for _ in range(words)) + endings[i % len(endings)]
        pool = list(WORDS[4:]) + list(RARE)
        choices = rng.sample(pool, rng.choice((2, 3, 4)))
        items.append({"prompt": prompt, "choices": choices, "answer": rng.randrange(len(choices))})
    return items


def text_examples(seed: int = 1, count: int = 12) -> list[dict]:
    """Documents of 3 to 60 words (many longer than a small max_length), some on several
    lines, some with a rare word."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        words = [rng.choice(WORDS + RARE[:1]) for _ in range(rng.choice((3, 9, 25, 60)))]
        if i % 3 == 0:
            words.insert(len(words) // 2, "\n")
        docs.append({"text": " ".join(words).replace(" \n ", "\n")})
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_bpe_world(root: Path, adapters: tuple[str, ...]) -> BpeWorld:
    """Tokenizer and base model under `root/base`, one random LoRA adapter per name (non-zero
    A and B, different shapes), and the eval data."""
    from transformers import AutoTokenizer

    base = root / "base"
    build_tokenizer(base)
    vocab_size = len(AutoTokenizer.from_pretrained(base))
    build_base_model(base, vocab_size)
    shapes = [
        AdapterShape(r=8, lora_alpha=16),
        AdapterShape(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
        AdapterShape(r=8, lora_alpha=4, target_modules=("k_proj", "o_proj", "up_proj")),
    ]
    built = {
        name: build_adapter(base, root / "adapters" / name, shapes[i % len(shapes)], seed=10 + i)
        for i, name in enumerate(adapters)
    }
    return BpeWorld(
        base=base,
        adapters=built,
        choice_path=write_jsonl(root / "choice.jsonl", choice_examples()),
        text_path=write_jsonl(root / "text.jsonl", text_examples()),
    )
