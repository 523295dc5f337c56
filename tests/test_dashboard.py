"""`autotransfer dashboard RUN`: which study it opens, what it says when it cannot, and a
real optuna-dashboard serving a RUN's study until Ctrl-C."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from autotransfer.dashboard import study_storage
from test_cli import _one_line_error, _search_run, _with, _without, run


def test_the_study_of_a_search_run_stays_its_own_when_the_run_moves(tmp_path: Path, image_folder: Path) -> None:
    out = _search_run(tmp_path, image_folder)
    assert study_storage(out) == f"sqlite:///{(out / 'study.db').resolve()}"
    moved = Path(shutil.move(out, tmp_path / "moved"))
    assert study_storage(moved) == f"sqlite:///{(moved / 'study.db').resolve()}"


ERRORS = {
    "not-a-folder": (lambda t, d: t / "nowhere", r"nowhere is not a folder; pass the RUN folder of a search"),
    "an-explicit-run": (
        lambda t, d: (t / "E").mkdir() or _with(t / "E", "plan.json"),
        r"E has no search\.json: it is not a search run; start one with `autotransfer fit DATA --out RUN`",
    ),
    "without-its-study": (
        lambda t, d: _without(_search_run(t, d), "study.db"),
        r"the study of .*/R is not in its storage .*/R/study\.db; restore it, or start a new search",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_a_run_without_a_study_is_one_line_exit_1(case: str, tmp_path: Path, image_folder: Path) -> None:
    make_run, match = ERRORS[case]
    _one_line_error(run("dashboard", make_run(tmp_path, image_folder)), match)


def test_without_optuna_dashboard_it_says_what_to_install(tmp_path: Path, image_folder: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import optuna_dashboard -> ImportError
    _one_line_error(run("dashboard", _search_run(tmp_path, image_folder)),
                    r"dashboard needs optuna-dashboard, which is not installed: pip install 'autotransfer\[dashboard\]'$")


def test_it_serves_the_runs_study_until_ctrl_c(tmp_path: Path, image_folder: Path) -> None:
    pytest.importorskip("optuna_dashboard")
    out = _search_run(tmp_path, image_folder)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "autotransfer", "dashboard", str(out), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        studies = _get(f"http://127.0.0.1:{port}/api/studies", server)
        trials = _get(f"http://127.0.0.1:{port}/api/studies/{studies['study_summaries'][0]['study_id']}", server)
    finally:
        stdout, stderr = _ctrl_c(server)
    assert [s["study_name"] for s in studies["study_summaries"]] == ["autotransfer"]
    assert len(trials["trials"]) == 2  # what _search_run ran
    assert server.returncode == 0, stderr
    assert stdout.splitlines() == [
        f"optuna-dashboard on the study of {out} ({(out / 'study.db').resolve()}): http://127.0.0.1:{port}/ (Ctrl-C stops it)",
        "dashboard stopped",
    ]


def _ctrl_c(server: subprocess.Popen) -> tuple[str, str]:
    """Ctrl-C, and again while it still serves 10 s later, as a user would: wsgiref
    swallows one that lands while it finishes a response (it logs the KeyboardInterrupt
    and serves on)."""
    for _ in range(3):
        server.send_signal(signal.SIGINT)
        try:
            return server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    server.kill()
    return server.communicate()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, server: subprocess.Popen, seconds: float = 60) -> dict:
    """The JSON at `url` once the server answers."""
    end = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return json.loads(response.read())
        except OSError:
            if server.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"no answer from {url}: {server.communicate()}") from None
            time.sleep(0.3)
