"""The demo world is the same bytes whatever the thread count: the base model and a trained
adapter, each built in fresh interpreters running torch on 1 and on 2 threads."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

BUILD = """
    import sys, torch
    from pathlib import Path
    from raymerge.demo.demo import Training, train_adapter
    from raymerge.demo.world import build_base_model
    torch.set_num_threads(int(sys.argv[2]))
    out = Path(sys.argv[1])
    base = build_base_model(out / "base", hidden_size=32, layers=1, vocab_size=256)
    train_adapter(base, out / "upper", "upper", seed=3, training=Training(steps=12, batch_size=8))
    print(torch.get_num_threads())
"""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_demo_world_is_the_same_bytes_on_one_thread_and_on_two(tmp_path):
    folders = []
    for threads in (1, 2):
        folder = tmp_path / f"threads{threads}"
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(BUILD), str(folder), str(threads)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        # Training puts the caller's thread count back afterwards.
        assert done.stdout.split()[-1] == str(threads)
        folders.append(folder)
    one, two = folders
    base = "base/model.safetensors"
    adapter = "upper/adapter_model.safetensors"
    assert _digest(one / base) == _digest(two / base)
    assert _digest(one / adapter) == _digest(two / adapter)
    # A real training run: the adapter moved away from PEFT's zero-initialised B.
    from safetensors.torch import load_file

    tensors = load_file(one / adapter)
    assert max(t.abs().max().item() for n, t in tensors.items() if "lora_B" in n) > 1e-3
