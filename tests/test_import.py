"""Importing paddlefsl: quiet, and no warning filter changed but the one it documents."""

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr + done.stdout


def test_import_hides_paddles_ccache_warning():
    if "No ccache found" not in _run("import paddle"):
        pytest.skip("this Paddle install does not warn about ccache (ccache installed?)")
    assert "ccache" not in _run("import paddlefsl")


def test_import_adds_one_narrow_filter_and_keeps_paddles_own():
    code = (
        "import warnings\n"
        "import paddle\n"
        "after_paddle = list(warnings.filters)\n"
        "import paddlefsl\n"
        "added = [f for f in warnings.filters if f not in after_paddle]\n"
        "assert [f for f in after_paddle if f not in warnings.filters] == [], 'filter lost'\n"
        "assert len(added) == 1, added\n"
        "action, message, category, module, _ = added[0]\n"
        "assert (action, message.pattern, category) == ('ignore', 'No ccache found', UserWarning)\n"
        "assert module.pattern == 'paddle'\n"
        "print('ok')\n"
    )
    assert "ok" in _run(code)
