"""`autotransfer dashboard RUN`: the Optuna study of a search in optuna-dashboard (the
optional extra `[dashboard]`), so that nobody needs to know where the study lives or
how optuna-dashboard is called: every trial with its parameters, scores per epoch,
pruning and parameter importances, in a browser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from autotransfer.errors import AutotransferError, RunError

INSTALL = "pip install 'autotransfer[dashboard]'"


def study_storage(run: str | Path) -> str:
    """The storage URL of RUN's search study (its SQLite file in RUN, or the server
    `fit --storage` named); RunError, saying what RUN should be, when it holds no study."""
    from autotransfer.search import SearchConfig, shown_storage, study_trials

    run = Path(run)
    if not run.is_dir():
        raise RunError(f"{run} is not a folder; pass the RUN folder of a search (`autotransfer fit DATA --out RUN`)")
    config = SearchConfig.load(run)
    if study_trials(config) is None:
        raise RunError(f"the study of {run} is not in its storage {shown_storage(config.storage)}; restore it, "
                       f"or start a new search with `autotransfer fit DATA --out NEW_RUN`")
    return config.storage


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8080, log: Callable[[str], None] = print) -> None:
    """Serve RUN's study with optuna-dashboard at http://HOST:PORT/ until Ctrl-C."""
    from autotransfer.search import shown_storage

    storage = study_storage(run)
    try:
        import optuna_dashboard
    except ImportError:
        raise AutotransferError(f"dashboard needs optuna-dashboard, which is not installed: {INSTALL}") from None
    log(f"optuna-dashboard on the study of {run} ({shown_storage(storage)}): http://{host}:{port}/ (Ctrl-C stops it)")
    try:
        optuna_dashboard.run_server(storage, host=host, port=port)
    except OSError as exc:  # the port is taken, or the host is not this machine's
        raise AutotransferError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); pass another --port or --host") from None
    log("dashboard stopped")  # the server returns on Ctrl-C
