"""One sweep shared by two worker processes through a real PostgreSQL server on loopback.

The server comes from Debian's postgresql package (apt-get install -y postgresql); the test runs
initdb/pg_ctl in a temporary directory, as the `postgres` user when the tests run as root (the
server refuses to run as root), and skips only when the server binaries are absent.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest

from sweep.results_io import read_results

from sweep_helpers import assert_one_row_per_trial, run_cli, studies


def _pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return os.path.dirname(found[-1])
    exe = shutil.which("pg_ctl")
    return os.path.dirname(os.path.realpath(exe)) if exe else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pg_url():
    bindir = _pg_bindir()
    if bindir is None or not os.path.exists(os.path.join(bindir, "initdb")):
        pytest.skip("PostgreSQL server binaries not found (CI needs: apt-get install -y postgresql)")
    pytest.importorskip("psycopg2", reason="psycopg2-binary (the test extra) is needed to talk to PostgreSQL")
    prefix: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        if runuser is None:
            pytest.skip("running as root and runuser is missing")
        prefix = [runuser, "-u", "postgres", "--"]
    root = tempfile.mkdtemp(prefix="lutforge-pg-")
    data = os.path.join(root, "data")
    if prefix:
        shutil.chown(root, "postgres", "postgres")
    port = _free_port()

    def pg(*args, check=True):
        return subprocess.run(prefix + list(args), capture_output=True, text=True, timeout=120, check=check)

    try:
        pg(os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        r = pg(os.path.join(bindir, "pg_ctl"), "-D", data, "-l", os.path.join(root, "server.log"), "-w",
               "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200", "start",
               check=False)
        if r.returncode != 0:
            log = open(os.path.join(root, "server.log")).read() if os.path.exists(os.path.join(root, "server.log")) \
                else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr}\n{log}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg(os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_sweep_through_postgres(pg_url, tmp_path):
    res = tmp_path / "results"
    r = run_cli(["sweep", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16", "--backend", "synthetic",
                 "--trials", "8", "--limit-shapes", "3", "--gpus", "0,1", "--storage", pg_url,
                 "--results", str(res), "--compile-workers", "2"])
    assert r.returncode == 0, r.stderr
    df = read_results(res)
    assert_one_row_per_trial(pg_url, df)  # no config measured twice although both workers searched each study
    owners = set()
    for name, st in studies(pg_url).items():
        measured = [t for t in st.trials if (t.user_attrs.get("row") or {}).get("status") not in (None, "invalid")
                    and t.user_attrs.get("duplicate_of") is None]
        assert len(measured) >= 8, name
        owners |= {t.user_attrs["worker"]["owner"] for t in st.trials if t.user_attrs.get("worker")}
        assert st.user_attrs["rebench"]["median_us"] > 0
    assert len(owners) == 2  # both worker processes did trials
    assert len(df[df["kind"] == "rebench"]["study"].unique()) == 3
