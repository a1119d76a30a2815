"""The merge side of a worker, without Ray: the held base model, the adapter cache and the
engines around the merge core. `MergeWorker` scores and publishes what it makes; `raymerge
materialize` rebuilds recorded merges with it in the user's own process.

Usage::

    merger = Merger(plan.worker_config())
    task = next(plan.tasks())
    merged = merger.merge(task, merger.inputs(task.adapters))
    merged.ran   # MergeRun(engine='fast', device='cpu', compute_dtype='float32', fallback=None)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from raymerge.load.adapters import load_adapter_tensors
from raymerge.load.base_model import BaseModel
from raymerge.load.cache import AdapterCache
from raymerge.merge import compat, core
from raymerge.merge.engines.fast import FastEngine
from raymerge.merge.engines.peft_engine import PeftEngine
from raymerge.merge.tensors import AdapterTensors, MergedAdapter
from raymerge.store import inputs as input_records
from raymerge.task import WorkerConfig


class Merger:
    """One base model's merges: inputs loaded once and kept (least recently used out beyond
    `adapter_cache_bytes`), merged by the configured engine, PEFT's path where the fast engine
    is not exact (it loads the base model's weights on first use)."""

    def __init__(self, config: WorkerConfig, input_digests: dict | None = None):
        self.config = config
        self.input_digests = input_digests or {}
        self.base = BaseModel(
            config.base_model,
            config.storage_options,
            task_type=config.task_type,
            torch_dtype=config.torch_dtype,
            gpu_headroom_gb=config.gpu_headroom_gb,
            gpus=config.gpus,
        )
        self.cache: AdapterCache[AdapterTensors] = AdapterCache(
            self._load_adapter,
            size=lambda adapter: adapter.nbytes,
            budget=config.adapter_cache_bytes,
            on_evict=self._forget,
        )
        self.fast = FastEngine(self.base.layout)
        self._peft: PeftEngine | None = None

    def inputs(self, names: Iterable[str]) -> list[AdapterTensors]:
        """The named input adapters, loaded (and checked against their digests) once."""
        return [self.cache.get(name) for name in names]

    def merge(self, recipe: core.Recipe, inputs: list[AdapterTensors]) -> MergedAdapter:
        """The merge core on this worker's engines."""
        if self.config.engine == "fast":
            return core.merge(recipe, inputs, self.fast, self.peft_engine)
        return core.merge(recipe, inputs, self.peft_engine(), lambda: self.fast)

    def release(self, keep: Iterable[str] = ()) -> None:
        """Drop cached inputs beyond the budget, never those in `keep`."""
        self.cache.evict(keep=set(keep))

    def peft_engine(self) -> PeftEngine:
        """PEFT's path on the held base model (built on first use: it needs the weights)."""
        if self._peft is None:
            self._peft = PeftEngine(
                self.base.load_adapter,
                charge=self.cache.charge,
                check_input=lambda adapter: compat.check_embedding_copies(adapter, self.base.model),
            )
        return self._peft

    def _load_adapter(self, name: str) -> AdapterTensors:
        uri = self.config.adapter_uris[name]
        adapter = load_adapter_tensors(
            name, uri, self.config.storage_options, self.base.layout, self.base.device
        )
        found = adapter.provenance["weights_sha256"]
        input_records.check_digest(name, uri, self.input_digests.get(name), found)
        return adapter

    def _forget(self, name: str) -> None:
        if self._peft is not None:
            self._peft.forget(name)


def merge_threads(config: WorkerConfig, device_type: str) -> int:
    """The intra-op threads of a merge's arithmetic: on the CPU, one fewer than the worker's
    while writer threads hash and write beside it. A parallel op waits for its slowest thread,
    and a thread whose core a writer holds waits out a scheduler slice: on 2 cores, merges of
    Llama-3.1-8B's layers ran at 2.0/s with 2 threads and 2.7/s with 1 (`raymerge bench merge
    --shape llama-8b --types linear`). Scoring keeps every thread."""
    threads = max(1, config.num_threads)
    if device_type == "cpu" and config.writers > 0 and threads > 1:
        return threads - 1
    return threads


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside, restored after."""
    import torch

    before = torch.get_num_threads()
    if threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
