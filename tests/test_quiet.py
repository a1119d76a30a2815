"""Library chatter is kept out of raymerge's output: progress bars off, library warnings counted
and summarised in one line, raymerge's own warnings still shown. Each case runs in a fresh
interpreter, since quieting changes process-wide state."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import raymerge

OWN_FILE = str(Path(raymerge.__file__).parent / "sweep" / "plan.py")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "RAYMERGE_SHOW_WARNINGS"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment, **env},
    )


WARN_FROM = """
    import warnings
    from raymerge.quiet import hidden_warnings, quiet_libraries
    quiet_libraries()
    def warn_from(filename, text, category):
        exec(compile(f"import warnings; warnings.warn({text!r}, {category})", filename, "exec"))
    for _ in range(3):
        warn_from("/opt/lib/site-packages/somelib/core.py", "old API", "FutureWarning")
    warn_from("/opt/lib/site-packages/peft/tuners.py", "peft says", "UserWarning")
    warn_from(OWN, "raymerge says", "UserWarning")
    print(hidden_warnings())
"""


def test_library_warnings_are_counted_not_printed_and_raymerge_warnings_are_shown():
    done = _python(f"OWN = {OWN_FILE!r}\n" + textwrap.dedent(WARN_FROM))
    assert done.returncode == 0, done.stderr
    assert "old API" not in done.stderr and "peft says" not in done.stderr
    assert "raymerge says" in done.stderr
    summary = done.stdout.strip()
    # The repeats from one place count once, as Python would have shown them once.
    assert summary.startswith("2 warnings from libraries hidden (2 kinds, e.g. FutureWarning: old")
    assert "RAYMERGE_SHOW_WARNINGS=1" in summary


def test_raymerge_show_warnings_shows_them_all():
    done = _python(f"OWN = {OWN_FILE!r}\n" + textwrap.dedent(WARN_FROM), RAYMERGE_SHOW_WARNINGS="1")
    assert done.returncode == 0, done.stderr
    assert "old API" in done.stderr and "peft says" in done.stderr
    assert done.stdout.strip() == "None"


def test_transformers_progress_bars_and_ray_auth_notice_are_off():
    done = _python(
        """
        import logging
        from raymerge.quiet import quiet_libraries
        quiet_libraries()
        from transformers.utils import logging as transformers_logging
        auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
        print(transformers_logging.is_progress_bar_enabled(), auth.getEffectiveLevel())
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", str(40)]


def test_a_user_setting_is_kept():
    done = _python(
        """
        import os
        from raymerge.quiet import quiet_libraries
        quiet_libraries()
        print(os.environ["TRANSFORMERS_VERBOSITY"])
        """,
        TRANSFORMERS_VERBOSITY="info",
    )
    assert done.stdout.strip() == "info"
