"""The merge worker: holds the base model once and an adapter cache, runs one merge at a time.

The driver wraps `MergeWorker` in a Ray actor with explicit `num_cpus`/`num_gpus`; Ray then sets
CUDA_VISIBLE_DEVICES so that `device_map="auto"` shards the model over this actor's GPUs only.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import tempfile
import time
import traceback
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

import raymerge
from raymerge import compat, manifest, storage
from raymerge import evaluate as scoring
from raymerge.adapters import CONFIG_FILE, WEIGHT_FILES
from raymerge.engines import fast, peft_engine
from raymerge.errors import MergeError
from raymerge.plan import MergeTask

log = logging.getLogger(__name__)
CONFIG_CACHE_ENTRIES = 256

AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
"""PEFT task type -> the transformers class that loads the base model for it."""


class MergeWorker:
    """Holds one base model (sharded over this worker's GPUs) and merges tasks on it.

    Input adapters stay loaded for later merges, least recently used first out once they hold
    more than `adapter_cache_bytes`; the adapters of the merge at hand are always kept.

    Example (without Ray):
        >>> worker = MergeWorker(0, "/models/base", {"a": "/ad/a", "b": "/ad/b"},
        ...                      "/out", {}, task_type="CAUSAL_LM")  # doctest: +SKIP
        >>> worker.merge(task)["status"]  # doctest: +SKIP
        'done'
    """

    def __init__(
        self,
        index: int,
        base_model: str,
        adapter_uris: dict[str, str],
        output: str,
        storage_options: dict[str, Any],
        *,
        task_type: str | None = None,
        num_threads: int = 1,
        torch_dtype: str = "auto",
        gpu_headroom_gb: float = 2.0,
        adapter_cache_bytes: int | None = None,
        engine: str = "fast",
        evaluate: dict[str, Any] | None = None,
    ):
        _quiet_libraries()
        torch.set_num_threads(max(1, num_threads))
        self.index = index
        self.base_model = base_model
        self.adapter_uris = adapter_uris
        self.output = output
        self.storage_options = storage_options
        self.adapter_cache_bytes = adapter_cache_bytes
        self.engine = engine
        self.evaluate = evaluate  # {"datasets": {name: uri}, "max_samples", "batch_size", ...}
        self._eval_batches: dict[str, list] | None = None
        self.adapter_loads = 0
        self.load_seconds = 0.0  # time spent loading input adapters, apart from merging
        self._peft: PeftModel | None = None
        self._loaded: OrderedDict[str, str] = OrderedDict()  # spec name -> PEFT name, LRU first
        self._bytes: dict[str, int] = {}  # spec name -> bytes its factors take
        self._provenance: dict[str, dict[str, Any]] = {}  # spec name -> location and digests
        self._names = itertools.count()
        self._tensors: OrderedDict[str, fast.AdapterTensors] = OrderedDict()  # fast engine's cache
        # Merged config bytes by inputs and rank (bounded: memory must not grow with the sweep).
        self._config_json: OrderedDict[tuple, bytes] = OrderedDict()
        self._model = self._load_base_model(task_type, torch_dtype, gpu_headroom_gb)
        # PEFT walks modules in this order; the fast engine follows it to draw the same masks.
        self._module_order = [name for name, _ in self._model.named_modules()]
        self._device = next(self._model.parameters()).device

    def _load_base_model(self, task_type: str | None, torch_dtype: str, headroom_gb: float):
        location = self.base_model
        if "://" in location or Path(location).is_absolute():
            location = str(storage.local_copy(location, self.storage_options))
        self._base_location = location
        auto_class = getattr(transformers, AUTO_CLASSES.get(task_type or "", "AutoModel"))
        kwargs: dict[str, Any] = {
            "dtype": torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype)
        }
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            # Ray limited CUDA_VISIBLE_DEVICES to this actor's GPUs: shard over those only, and
            # keep headroom on each for adapters and merge buffers.
            kwargs["device_map"] = "auto"
            kwargs["max_memory"] = gpu_memory_budget(headroom_gb)
        model = auto_class.from_pretrained(location, **kwargs)
        model.eval()
        return model

    def info(self) -> dict[str, Any]:
        """Where this worker runs; the driver calls it to know the worker is (back) up."""
        devices = sorted({str(p.device) for p in self._model.parameters()})
        return {
            "index": self.index,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "devices": devices,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def merge(self, task: MergeTask, attempt: int = 0) -> dict[str, Any]:
        """Merge, write the adapter files, then commit merge.json. Never raises for a bad merge.

        A retried task (`attempt` > 0) whose merge.json exists was committed by a worker that died
        right after: it is reported, not written again.
        """
        started = time.perf_counter()
        loads_before, load_seconds_before = self.adapter_loads, self.load_seconds
        try:
            if attempt and (
                record := manifest.read_committed(self.output, task.merge_id, self.storage_options)
            ):
                return self._result(task, "done", record=record, started=started, loads=0)
            engine, fallback, contents = self._merge(task)
            metrics = self._score_adapter_files(contents) if self.evaluate else None
            files = self._upload(contents, manifest.merge_dir(self.output, task.merge_id))
            record = manifest.merge_record(
                task,
                inputs=[self._provenance[name] for name in task.adapters],
                base_model=self.base_model,
                engine=engine,
                engine_fallback=fallback,
                metrics=metrics,
                compute_dtype="float32",
                files=files,
                seconds=time.perf_counter() - started,
                worker={"index": self.index, "host": socket.gethostname()},
                versions=_versions(),
            )
            manifest.commit_merge(self.output, record, self.storage_options)
            loads = self.adapter_loads - loads_before
            return self._result(
                task,
                "done",
                record=record,
                started=started,
                loads=loads,
                load_seconds=self.load_seconds - load_seconds_before,
            )
        except Exception as exc:
            log.error("merge %s failed:\n%s", task.merge_id, traceback.format_exc())
            return self._result(
                task,
                "failed",
                error=f"{type(exc).__name__}: {exc}",
                started=started,
                loads=self.adapter_loads - loads_before,
            )
        finally:
            self._evict(keep=set(task.adapters))

    def score_references(self, names: list[str]) -> dict[str, Any]:
        """The base model alone and each input adapter alone, on every eval set."""
        references: dict[str, Any] = {"base": self._score(None), "adapters": {}}
        for name in names:
            references["adapters"][name] = self._score(self._ensure_adapter(name))
        return references

    def _score_adapter_files(self, contents: dict[str, bytes]) -> dict[str, dict[str, float]]:
        """Score the merged adapter as written: its files, loaded like a user would load them."""
        name = f"eval_{next(self._names)}"
        with tempfile.TemporaryDirectory(prefix="raymerge-eval-") as tmp:
            for file_name, data in contents.items():
                (Path(tmp) / file_name).write_bytes(data)
            self._load_into_peft(tmp, name)
        try:
            return self._score(name)
        finally:
            self._peft.delete_adapter(name)

    def _score(self, adapter: str | None) -> dict[str, dict[str, float]]:
        """Metrics per eval set with only `adapter` active (None: the base model alone)."""
        batches = self._batches()
        if self._peft is None or not self._peft.peft_config:
            # No adapter loaded (LoRA layers without adapters pass the base output through).
            return {ds: scoring.score(self._model, b) for ds, b in batches.items()}
        if adapter is None:
            with self._peft.disable_adapter():
                return {ds: scoring.score(self._peft, b) for ds, b in batches.items()}
        self._peft.set_adapter(adapter)
        return {ds: scoring.score(self._peft, b) for ds, b in batches.items()}

    def _batches(self) -> dict[str, list]:
        """The eval sets, tokenized once with the base model's tokenizer."""
        if self._eval_batches is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(self._base_location)
            config = self.evaluate
            self._eval_batches = {
                name: scoring.make_batches(
                    tokenizer,
                    scoring.load_texts(name, uri, config["max_samples"], self.storage_options),
                    config["batch_size"],
                    config["max_length"],
                )
                for name, uri in config["datasets"].items()
            }
        return self._eval_batches

    def _merge(self, task: MergeTask) -> tuple[str, str | None, dict[str, bytes]]:
        """The merged adapter's files (name -> bytes), the engine that made them and, if the fast
        engine handed the merge to PEFT's path, why."""
        if self.engine == fast.ENGINE:
            inputs = [self._adapter_tensors(name) for name in task.adapters]
            reason = fast.unsupported(inputs, task.combination_type)
            if reason is None:
                state, config = fast.merge(
                    inputs,
                    task.weights,
                    task.combination_type,
                    task.params,
                    task.merge_seed,
                    self._module_order,
                )
                dtype = getattr(torch, task.output_dtype)
                state = {k: v.to(dtype) for k, v in state.items()}
                config_key = (task.adapters, config.r)
                if config_key not in self._config_json:
                    self._config_json[config_key] = fast.config_json(config)
                    if len(self._config_json) > CONFIG_CACHE_ENTRIES:
                        self._config_json.popitem(last=False)
                weights_file, config_file = manifest.ADAPTER_FILES
                contents = {
                    weights_file: save_safetensors(state, metadata={"format": "pt"}),
                    config_file: self._config_json[config_key],
                }
                return fast.ENGINE, None, contents
            reason = f"the fast engine does not handle {reason}"
            return peft_engine.ENGINE, reason, self._merge_with_peft(task)
        return peft_engine.ENGINE, None, self._merge_with_peft(task)

    def _merge_with_peft(self, task: MergeTask) -> dict[str, bytes]:
        merged = f"merge_{task.merge_id}"
        try:
            names = [self._ensure_adapter(name) for name in task.adapters]
            peft_engine.add_merged_adapter(
                self._peft,
                merged,
                names,
                task.weights,
                task.combination_type,
                task.params,
                task.merge_seed,
            )
            peft_engine.cast_adapter(self._peft, merged, getattr(torch, task.output_dtype))
            with tempfile.TemporaryDirectory(prefix="raymerge-") as tmp:
                self._peft.save_pretrained(tmp, selected_adapters=[merged])
                return {
                    name: (Path(tmp) / merged / name).read_bytes()
                    for name in manifest.ADAPTER_FILES
                }
        finally:
            if self._peft is not None and merged in self._peft.peft_config:
                self._peft.delete_adapter(merged)  # memory must not grow with the sweep

    def _upload(self, contents: dict[str, bytes], destination: str) -> dict[str, dict[str, Any]]:
        """Write the adapter files (each atomically); returns their sizes and digests."""
        files = {}
        for name, data in contents.items():
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            storage.write_bytes(storage.join(destination, name), data, self.storage_options)
        return files

    def _result(
        self, task: MergeTask, status: str, *, started: float, loads: int, **extra
    ) -> dict[str, Any]:
        return {
            "merge_id": task.merge_id,
            "status": status,
            "worker": self.index,
            "adapter_loads": loads,
            "cached": sorted({*self._loaded, *self._tensors}),
            "seconds": time.perf_counter() - started,
            **extra,
        }

    def _ensure_adapter(self, name: str) -> str:
        """Load adapter `name` once, in float32 (the merge arithmetic's dtype); merges reuse it."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        started = time.perf_counter()
        path, weights = self._local_adapter(name)
        if weights.suffix == ".safetensors":
            self._check_base_copies(name, weights)
        # PEFT keeps adapters in ModuleDicts, whose keys cannot hold '.': use our own names.
        peft_name = f"adapter_{next(self._names)}"
        self._load_into_peft(path, peft_name)
        peft_engine.cast_adapter(self._peft, peft_name, peft_engine.COMPUTE_DTYPE)
        self._loaded[name] = peft_name
        self._bytes[name] = peft_engine.adapter_bytes(self._peft, peft_name)
        self.adapter_loads += 1
        self.load_seconds += time.perf_counter() - started
        return peft_name

    def _adapter_tensors(self, name: str) -> fast.AdapterTensors:
        """Adapter `name`'s config and factors for the fast engine, read once and cached."""
        if name in self._tensors:
            self._tensors.move_to_end(name)
            return self._tensors[name]
        started = time.perf_counter()
        path, weights = self._local_adapter(name)
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:  # admitted by the plan only with allow_pickle: true
            state = torch.load(weights, map_location="cpu", weights_only=True)
        config = LoraConfig.from_pretrained(str(path))
        config.inference_mode = True  # as PeftModel.from_pretrained loads it
        self._tensors[name] = fast.adapter_tensors(config, state, self._device)
        self.adapter_loads += 1
        self.load_seconds += time.perf_counter() - started
        return self._tensors[name]

    def _local_adapter(self, name: str) -> tuple[Path, Path]:
        """Adapter `name`'s local folder (node cache for remote ones) and weights file; records
        its provenance for merge.json."""
        path = storage.local_copy(self.adapter_uris[name], self.storage_options)
        weights = next(path / f for f in WEIGHT_FILES if (path / f).exists())
        self._record_provenance(name, path, weights)
        return path, weights

    def _load_into_peft(self, path: Path | str, adapter_name: str) -> None:
        """Load an adapter folder into the PeftModel, wrapping the base model on first use."""
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(
                self._model, str(path), adapter_name=adapter_name
            )
        else:
            self._peft.load_adapter(str(path), adapter_name=adapter_name)

    def _record_provenance(self, name: str, path: Path, weights: Path) -> None:
        if name not in self._provenance:
            self._provenance[name] = {
                "name": name,
                "uri": self.adapter_uris[name],
                "weights_file": weights.name,
                "weights_sha256": _sha256(weights),
                "config_sha256": _sha256(path / CONFIG_FILE),
            }

    def _evict(self, keep: set[str]) -> None:
        """Unload least recently used adapters until each cache fits its budget."""
        if self.adapter_cache_bytes is None:
            return
        for name in list(self._tensors):
            if sum(t.nbytes for t in self._tensors.values()) <= self.adapter_cache_bytes:
                break
            if name not in keep:
                del self._tensors[name]
        for name in list(self._loaded):
            if sum(self._bytes[n] for n in self._loaded) <= self.adapter_cache_bytes:
                break
            if name not in keep:
                self._peft.delete_adapter(self._loaded.pop(name))

    def _check_base_copies(self, name: str, weights: Path) -> None:
        """An embedding LoRA may carry a full copy of the embedding (PEFT saves one beside it).

        Loading it overwrites the held base model's weights, so it must equal them exactly.
        """
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                match = compat.BASE_LAYER_KEY.match(key)
                if not match:
                    continue
                module = self._model.get_submodule(match["module"])
                held = getattr(module, "base_layer", module).weight
                theirs = f.get_tensor(key).to(device=held.device, dtype=held.dtype)
                if not torch.equal(theirs, held.data):
                    raise MergeError(
                        f"adapter {name!r} carries its own {match['module']} weights, which "
                        "differ from the base model's (a trained or resized embedding); a merge "
                        "cannot carry them: use adapters saved with save_embedding_layers=False"
                    )


def gpu_memory_budget(headroom_gb: float) -> dict[int, int]:
    """Bytes of base-model weights accelerate may put on each visible GPU: all but the headroom."""
    budget = {}
    for device in range(torch.cuda.device_count()):
        _, total = torch.cuda.mem_get_info(device)
        budget[device] = max(0, total - int(headroom_gb * 2**30))
    return budget


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    return {
        "raymerge": raymerge.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _quiet_libraries() -> None:
    """Library chatter from every worker would drown the driver's progress bar."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
