"""We coexist with current transformers: since 5.25 it imports Hugging Face's `kernels` package, which a
top-level `kernels/` of ours would shadow in any process started from the repo root (hence sft_kernels/)."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

CHECK = """
import sys
import sft_kernels.attention, sft_kernels.lm_head_loss   # ours
from transformers.models.qwen2 import modeling_qwen2     # imports `kernels` where transformers needs it
from transformers.models.qwen3 import modeling_qwen3
kernels = sys.modules.get("kernels")
print(kernels.__file__ if kernels else "no kernels module")
"""


def test_transformers_and_sft_kernels_in_one_process():
    pytest.importorskip("transformers")
    # `python -c` from the repo root puts the root first on sys.path, as a notebook or script there would.
    p = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()).parent != ROOT / "kernels", p.stdout  # Hugging Face's kernels, not ours
    assert not (ROOT / "kernels").exists()
