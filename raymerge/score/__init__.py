"""Scoring merges: eval sets, the scorer (many merges per forward pass), the lm-eval bridge
and the objective."""
