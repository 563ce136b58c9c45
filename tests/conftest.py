import os
import sys
from pathlib import Path

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before any project
# import. Without an NVIDIA device the kernels run in the interpreter (on CPU tensors).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ../shared/reference exists in CI and in the team's checkouts, not in a user's clone.
REFERENCE = ROOT.parent / "shared" / "reference"
