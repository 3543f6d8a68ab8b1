"""nbval runs each notebook in a fresh kernel: let that kernel import vlab from this
checkout even where the package is not installed (an editable install points here too)."""
import os
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _ROOT])
