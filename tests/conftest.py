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


def pytest_terminal_summary(terminalreporter):
    """Without ../shared, one line saying how many tests it skipped (-q output lists no skip reasons)."""
    if REFERENCE.is_dir():
        return
    reasons = [r.longrepr[2] for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and len(r.longrepr) == 3]
    n = sum("shared/reference" in reason for reason in reasons)
    terminalreporter.write_line(f"{n} tests skipped because the shared reference files ({REFERENCE}) are absent; "
                                "the other tests ran.")
