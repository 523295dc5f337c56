"""The tail every benchmark shares: where it ran, with what, and its JSON result.

Timings on a shared machine mean little without the cores, threads and load beside them,
so every result file carries the same facts.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from types import ModuleType

import torch


def machine() -> dict:
    """The machine and how busy it was, as the result fields `machine` and `load_average_after`."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }


def versions(*modules: ModuleType) -> dict[str, str]:
    """`__version__` of each module by its name, then Python's."""
    return {m.__name__: m.__version__ for m in modules} | {"python": platform.python_version()}


def write_result(path: Path, result: dict) -> None:
    """Write RESULT as indented JSON to PATH (making its folder) and print it."""
    text = json.dumps(result, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)
