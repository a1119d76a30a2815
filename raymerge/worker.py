"""The merge worker: holds the base model once and an adapter cache, runs one merge at a time.

The driver wraps `MergeWorker` in a Ray actor with explicit `num_cpus`/`num_gpus`; Ray then sets
CUDA_VISIBLE_DEVICES so that `device_map="auto"` shards the model over this actor's GPUs only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import PeftModel
from safetensors import safe_open

import raymerge
from raymerge import compat, manifest, storage
from raymerge.adapters import CONFIG_FILE, WEIGHT_FILES
from raymerge.engines import peft_engine
from raymerge.errors import MergeError
from raymerge.plan import MergeTask

log = logging.getLogger(__name__)

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
        task_type: str | None = None,
        num_threads: int = 1,
    ):
        _quiet_libraries()
        torch.set_num_threads(max(1, num_threads))
        self.index = index
        self.base_model = base_model
        self.adapter_uris = adapter_uris
        self.output = output
        self.storage_options = storage_options
        self.adapter_loads = 0
        self._peft: PeftModel | None = None
        self._loaded: dict[str, str] = {}  # spec name -> PEFT adapter name
        self._provenance: dict[str, dict[str, Any]] = {}  # spec name -> location and digests
        self._model = self._load_base_model(task_type)

    def _load_base_model(self, task_type: str | None):
        location = self.base_model
        if "://" in location or Path(location).is_absolute():
            location = str(storage.local_copy(location, self.storage_options))
        auto_class = getattr(transformers, AUTO_CLASSES.get(task_type or "", "AutoModel"))
        kwargs: dict[str, Any] = {}
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            # Ray limited CUDA_VISIBLE_DEVICES to this actor's GPUs: "auto" shards over them.
            kwargs["device_map"] = "auto"
        model = auto_class.from_pretrained(location, **kwargs)
        model.eval()
        return model

    def info(self) -> dict[str, Any]:
        """Where this worker runs; called once by the driver to know it is ready."""
        return {
            "index": self.index,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(next(self._model.parameters()).device),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def merge(self, task: MergeTask) -> dict[str, Any]:
        """Merge, write the adapter files, then commit merge.json. Never raises for a bad merge."""
        started = time.perf_counter()
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
            files = self._write_adapter(merged, manifest.merge_dir(self.output, task.merge_id))
            record = manifest.merge_record(
                task,
                inputs=[self._provenance[name] for name in task.adapters],
                base_model=self.base_model,
                engine=peft_engine.ENGINE,
                compute_dtype=str(peft_engine.COMPUTE_DTYPE).removeprefix("torch."),
                files=files,
                seconds=time.perf_counter() - started,
                worker={"index": self.index, "host": socket.gethostname()},
                versions=_versions(),
            )
            manifest.commit_merge(self.output, record, self.storage_options)
            return {"merge_id": task.merge_id, "status": "done", "record": record}
        except Exception as exc:
            log.error("merge %s failed:\n%s", task.merge_id, traceback.format_exc())
            return {
                "merge_id": task.merge_id,
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - started,
            }
        finally:
            if self._peft is not None and merged in self._peft.peft_config:
                self._peft.delete_adapter(merged)  # memory must not grow with the sweep

    def stats(self) -> dict[str, Any]:
        return {"index": self.index, "adapter_loads": self.adapter_loads}

    def _ensure_adapter(self, name: str) -> str:
        """Load adapter `name` once, in float32 (the merge arithmetic's dtype); merges reuse it."""
        if name in self._loaded:
            return self._loaded[name]
        path = storage.local_copy(self.adapter_uris[name], self.storage_options)
        weights = next(path / f for f in WEIGHT_FILES if (path / f).exists())
        if weights.suffix == ".safetensors":
            self._check_base_copies(name, weights)
        # PEFT keeps adapters in ModuleDicts, whose keys cannot hold '.': use our own names.
        peft_name = f"adapter_{len(self._loaded)}"
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self._model, str(path), adapter_name=peft_name)
        else:
            self._peft.load_adapter(str(path), adapter_name=peft_name)
        peft_engine.cast_adapter(self._peft, peft_name, peft_engine.COMPUTE_DTYPE)
        self._loaded[name] = peft_name
        self._provenance[name] = {
            "name": name,
            "uri": self.adapter_uris[name],
            "weights_file": weights.name,
            "weights_sha256": _sha256(weights),
            "config_sha256": _sha256(path / CONFIG_FILE),
        }
        self.adapter_loads += 1
        return peft_name

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

    def _write_adapter(self, adapter: str, destination: str) -> dict[str, dict[str, Any]]:
        """save_pretrained the merged adapter alone and upload its files; returns their digests."""
        files = {}
        with tempfile.TemporaryDirectory(prefix="raymerge-") as tmp:
            self._peft.save_pretrained(tmp, selected_adapters=[adapter])
            folder = Path(tmp) / adapter
            for name in manifest.ADAPTER_FILES:
                data = (folder / name).read_bytes()
                files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                storage.upload_file(
                    folder / name, storage.join(destination, name), self.storage_options
                )
        return files


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
