"""Tiny local worlds (models, tokenizer, adapters) and the demo's trained world."""
