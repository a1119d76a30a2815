"""Merge engines: pure functions over models, tensors and configs; no Ray, storage or globals."""
