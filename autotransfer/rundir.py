"""A RUN folder holds one run: one dataset, one kind of run (a search or one Plan).

`fit` into a folder that already holds something refused to say so: a second search
reused the first one's study (and adopted a model of other data), an explicit Plan
mixed its files into a search's. A new run therefore starts in an empty folder, or in
one that `--overwrite` clears first, and only of what autotransfer writes there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from autotransfer.errors import RunError

# Everything autotransfer writes at the top of a RUN (train, selector, search, profile,
# report); `--overwrite` deletes nothing else.
RUN_ENTRIES = frozenset({
    "model.pt", "plan.json", "scan.json", "metrics.json", "logs", "lightning_logs",
    "profile.json", "profiles", "search.json", "leaderboard.csv", "trials", "report",
    "study.db", "study.db-journal", "study.db-wal", "study.db-shm",
})


def claim_run_dir(out: Path, overwrite: bool = False, data: Path | str = "DATA") -> None:
    """Make `out` an empty RUN folder for a new run, or say in one line why not.

    A non-empty `out` is refused unless `overwrite`, which deletes what autotransfer wrote
    there; a folder holding anything else is never cleared. `data` only shapes the hint.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; a RUN is a folder: choose another --out")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        resume = f"continue its search with `autotransfer fit {data} --resume --out {out}`, " if "search.json" in entries else ""
        raise RunError(
            f"--out {out} is not empty ({shown}); a RUN holds one run: {resume}choose a new --out, "
            "or add --overwrite to replace it"
        )
    foreign = [name for name in entries if name not in RUN_ENTRIES]
    if foreign:
        raise RunError(
            f"--overwrite would delete {out / foreign[0]}, which autotransfer did not write; "
            "move it away or choose another --out"
        )
    for name in entries:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
