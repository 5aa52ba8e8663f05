"""Shared services for a team: a PostgreSQL cluster, an MLflow tracking server and a Prefect server on it.

    lmpipe services up        # make services: start what is not running, print the export lines to use
    lmpipe services status    # each service: running/stopped, pid, URL
    lmpipe services down      # stop exactly what `up` started (by pid file), nothing else

Everything lives in one git-ignored state folder (params.yaml `services.state_dir`, env LMPIPE_SERVICES_DIR
or `--state-dir`): the cluster (`postgres/data`, made by `initdb`, run by `pg_ctl`), its generated password
(`pg-password`, mode 0600), the MLflow artifacts (`mlartifacts/`), one log and one pid file per server and
`ports.json` (the ports in use). PostgreSQL listens on 127.0.0.1 only (TCP, password auth, no unix socket);
MLflow and Prefect bind `services.host`. Each server runs in its own session, so a Ctrl-C in the terminal
that started it does not stop it, and `down` signals exactly that session's process group.

PostgreSQL refuses to run as root: as root its commands run as the `postgres` user (Debian's package
creates it), which must be able to enter the state folder. Missing `initdb` as root: Debian's
`postgresql` package is installed with apt-get (what it runs is printed first).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psycopg2
import requests

from lmpipe import processes
from lmpipe.config import Services
from lmpipe.errors import ServiceError
from lmpipe.io import write_json
from lmpipe.processes import free_port, port_free

STATE_ENV = "LMPIPE_SERVICES_DIR"
PG_USER = "lmpipe"  # the cluster's superuser, made by initdb; MLflow and Prefect connect as it
DATABASES = ("mlflow", "prefect")
SERVERS = ("mlflow", "prefect")  # detached python servers with pid files; postgres has postmaster.pid


@dataclass(frozen=True)
class Layout:
    """Paths inside the state folder."""

    root: Path

    @property
    def pg_dir(self) -> Path:  # owned by the user postgres runs as
        return self.root / "postgres"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_log(self) -> Path:
        return self.pg_dir / "postgres.log"

    @property
    def password(self) -> Path:
        return self.root / "pg-password"

    @property
    def ports(self) -> Path:
        return self.root / "ports.json"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def pid(self, name: str) -> Path:
        return self.root / f"{name}.pid"


def layout(root: Path, cfg: Services, state_dir: str | None = None) -> Layout:
    """The state folder: --state-dir, else $LMPIPE_SERVICES_DIR, else services.state_dir (relative to the repo)."""
    path = Path(state_dir or os.environ.get(STATE_ENV) or cfg.state_dir).expanduser()
    return Layout((path if path.is_absolute() else root / path).resolve())


# --- processes -------------------------------------------------------------------------------------------

def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has exited


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1]


def read_pid(path: Path) -> int | None:
    """The pid in a pid file written by `spawn`, if that very process still runs: same start time and same
    command line (a pid reused by another program is never taken for ours)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = rec.get("pid")
    if not isinstance(pid, int) or _proc_start(pid) != rec.get("start") or _proc_cmdline(pid) != rec.get("cmdline"):
        return None
    return pid


def spawn(name: str, cmd: list[str], env: dict[str, str], lay: Layout) -> int:
    """Start `cmd` detached in its own session, output to <state>/<name>.log; record its pid file."""
    with open(lay.log(name), "ab") as log:
        proc = subprocess.Popen(cmd, cwd=lay.root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    # Popen can return before /proc shows the new program (measured: an empty cmdline for 106 of 200 spawns
    # read at once); wait until it shows our command line, which is what read_pid compares
    deadline = time.monotonic() + 10
    while _proc_cmdline(proc.pid) != cmd and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    rec = {"pid": proc.pid, "start": _proc_start(proc.pid), "cmdline": _proc_cmdline(proc.pid)}
    write_json(lay.pid(name), rec)
    return proc.pid


def stop_group(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group `pid` leads (the session spawn started), SIGKILL what is left after `timeout`."""
    if not processes.stop_group(pid, timeout):
        raise ServiceError(f"process group {pid} survived SIGKILL")


def _write_private(path: Path, text: str) -> None:
    """A file only its owner can read, from its first byte (not chmod after a world-readable write)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _pick_port(key: str, host: str, configured: int, recorded: int | None, avoid: set[int] = frozenset()) -> int:
    """The configured port, else (0) the one used before, else a free one; refused in one line when taken."""
    port = configured or recorded or free_port(host, avoid)
    if port in avoid or not port_free(host, port):
        raise ServiceError(f"services.{key}: {host}:{port} is in use by another process; set services.{key} to a "
                           f"free port (params.yaml or --set services.{key}=N; 0 = any free port)")
    return port


# --- PostgreSQL ------------------------------------------------------------------------------------------

def pg_bin(name: str) -> str | None:
    """A PostgreSQL program: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


def ensure_postgres_installed() -> None:
    """initdb present, else (as root, on Debian) apt-get install postgresql, else one line saying how."""
    if pg_bin("initdb"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServiceError("initdb not found: install PostgreSQL (Debian: `sudo apt-get install -y postgresql`)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        print(f"postgres: initdb not found; running `{' '.join(cmd)}`", flush=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise ServiceError(f"`{' '.join(cmd)}` failed (exit {res.returncode}): {tail[0]}")
    if not pg_bin("initdb"):
        raise ServiceError("apt-get installed postgresql but initdb is still not found")


def _as_pg_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _pg(cmd: list[str], what: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # start_new_session: the postmaster pg_ctl forks must not share our terminal's process group
    res = subprocess.run(_as_pg_user(cmd), capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if res.returncode != 0:
        lines = (res.stderr.strip() or res.stdout.strip()).splitlines() or ["no output"]
        raise ServiceError(f"postgres: {what} failed: {lines[-1]}")
    return res


def init_cluster(lay: Layout) -> bool:
    """initdb the cluster under <state>/postgres/data once (superuser lmpipe, a generated password,
    scram-sha-256 over TCP). Returns whether it was created now."""
    if (lay.pg_data / "PG_VERSION").is_file():
        return False
    lay.pg_dir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    pwfile = lay.pg_dir / ".initdb-pw"  # initdb reads it as the postgres user; removed right after
    for path in (lay.password, pwfile):
        _write_private(path, password + "\n")
    if os.geteuid() == 0:
        shutil.chown(lay.pg_dir, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
        if subprocess.run(_as_pg_user(["test", "-w", str(lay.pg_dir)])).returncode != 0:
            raise ServiceError(f"{lay.root}: the postgres user cannot enter the state folder (a parent folder is "
                               "private); use a state dir others can traverse (--state-dir or LMPIPE_SERVICES_DIR)")
    try:
        _pg([pg_bin("initdb"), "-D", str(lay.pg_data), "-U", PG_USER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
             "-E", "UTF8", "--locale=C.UTF-8"], "initdb")
    finally:
        pwfile.unlink(missing_ok=True)
    return True


def _postmaster(lay: Layout) -> list[str]:
    """postmaster.pid's lines: pid, data dir, start time, port, ..."""
    try:
        return (lay.pg_data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return []


def postgres_pid(lay: Layout) -> int | None:
    """The postmaster's pid when `pg_ctl status` says the cluster runs."""
    if not (lay.pg_data / "PG_VERSION").is_file():
        return None
    res = subprocess.run(_as_pg_user([pg_bin("pg_ctl"), "status", "-D", str(lay.pg_data)]), capture_output=True,
                         text=True)
    if res.returncode != 0:
        return None
    lines = _postmaster(lay)
    return int(lines[0]) if lines and lines[0].isdigit() else None


def start_postgres(lay: Layout, port: int, timeout: float) -> None:
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
    _pg([pg_bin("pg_ctl"), "start", "-D", str(lay.pg_data), "-l", str(lay.pg_log), "-w", "-t", str(int(timeout)),
         "-o", opts], f"pg_ctl start (see {lay.pg_log})", timeout=timeout + 30)


def stop_postgres(lay: Layout) -> None:
    _pg([pg_bin("pg_ctl"), "stop", "-D", str(lay.pg_data), "-m", "fast", "-w", "-t", "60"], "pg_ctl stop")


def db_url(lay: Layout, port: int, db: str, driver: str = "postgresql") -> str:
    password = lay.password.read_text().strip()
    return f"{driver}://{PG_USER}:{password}@127.0.0.1:{port}/{db}"


def create_databases(lay: Layout, port: int) -> None:
    try:
        conn = psycopg2.connect(db_url(lay, port, "postgres"), connect_timeout=10)
    except psycopg2.Error as e:
        raise ServiceError(f"postgres: cannot connect on 127.0.0.1:{port} ({str(e).strip().splitlines()[0]}); "
                           f"see {lay.pg_log}") from None
    conn.autocommit = True  # CREATE DATABASE cannot run in a transaction (so no `with conn`, which opens one)
    try:
        with conn.cursor() as cur:
            for db in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{db}"')
    except psycopg2.Error as e:
        raise ServiceError(f"postgres: creating the databases failed ({str(e).strip().splitlines()[0]})") from None
    finally:
        conn.close()


# --- the servers -----------------------------------------------------------------------------------------

def server_cmd(name: str, host: str, port: int, cfg: Services, lay: Layout) -> list[str]:
    if name == "mlflow":
        return [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", str(lay.artifacts),
                "--host", host, "--port", str(port), "--workers", str(cfg.mlflow_workers)]
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


def server_env(name: str, lay: Layout, pg_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "PREFECT_API_URL"))}
    if name == "mlflow":
        # the store URI (with its password) by environment, not on the command line `ps` shows
        env["MLFLOW_BACKEND_STORE_URI"] = db_url(lay, pg_port, "mlflow", "postgresql+psycopg2")  # SQLAlchemy 2.1 defaults to psycopg 3
        # MLflow 3 otherwise forks a job runner and 7 huey consumers (GenAI scorer jobs lmpipe never submits)
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    else:
        env.update(PREFECT_API_DATABASE_CONNECTION_URL=db_url(lay, pg_port, "prefect", "postgresql+asyncpg"),
                   PREFECT_HOME=str(lay.root / "prefect-home"))
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return env


def health_url(name: str, host: str, port: int) -> str:
    return f"{url(name, host, port)}/health"


def url(name: str, host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}" + ("/api" if name == "prefect" else "")


def wait_healthy(name: str, pid: int, check: str, lay: Layout, timeout: float) -> None:
    """Poll the health endpoint until it answers 200; one line naming the log when the server exits or is late."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(check, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if _proc_start(pid) is None:
            raise ServiceError(f"{name}: server exited before answering {check}; see {lay.log(name)}")
        if time.monotonic() > deadline:
            stop_group(pid)
            raise ServiceError(f"{name}: no answer from {check} within {timeout:g} s (stopped it); see {lay.log(name)}")
        time.sleep(0.5)


# --- the commands ----------------------------------------------------------------------------------------

def _recorded(lay: Layout) -> dict:
    try:
        return json.loads(lay.ports.read_text())
    except (OSError, ValueError):
        return {}


def exports(rec: dict) -> list[str]:
    return [f"export MLFLOW_TRACKING_URI={url('mlflow', rec['host'], rec['mlflow_port'])}",
            f"export PREFECT_API_URL={url('prefect', rec['host'], rec['prefect_port'])}"]


def up(lay: Layout, cfg: Services) -> Iterator[str]:
    """Start whatever of postgres, mlflow, prefect is not running; yields the lines to print as it goes."""
    lay.root.mkdir(parents=True, exist_ok=True)
    rec = _recorded(lay)
    # servers still running keep the host they bound; otherwise params decide
    if not (rec.get("host") and any(read_pid(lay.pid(n)) for n in SERVERS)):
        rec["host"] = cfg.host
    host = rec["host"]
    started = False

    # 1) PostgreSQL: install if missing, initdb once, start, create the two databases
    ensure_postgres_installed()
    if init_cluster(lay):
        yield f"postgres: initialised a cluster in {lay.pg_data}"
    pid = postgres_pid(lay)
    if pid is None:
        rec["postgres_port"] = _pick_port("postgres_port", "127.0.0.1", cfg.postgres_port, rec.get("postgres_port"))
        start_postgres(lay, rec["postgres_port"], cfg.start_timeout_s)
        pid, started = postgres_pid(lay), True
        yield f"postgres: started on 127.0.0.1:{rec['postgres_port']} (pid {pid}, log {lay.pg_log})"
    else:
        rec["postgres_port"] = int(_postmaster(lay)[3])  # the port it runs on, whatever was recorded
        yield f"postgres: already running on 127.0.0.1:{rec['postgres_port']} (pid {pid})"
    create_databases(lay, rec["postgres_port"])
    write_json(lay.ports, rec)

    # 2) MLflow and 3) Prefect: each detached, both started before either is waited for (their first start
    # migrates their database: ~1 min each on 2 cores), then checked by its health endpoint
    spawned = {}
    for name in SERVERS:
        key = f"{name}_port"
        pid = read_pid(lay.pid(name))
        if pid is not None:
            yield f"{name}: already running at {url(name, host, rec[key])} (pid {pid})"
            continue
        taken = {rec[f"{other}_port"] for other in spawned}  # started, maybe not listening yet
        rec[key] = _pick_port(key, host, getattr(cfg, key), rec.get(key), taken)
        write_json(lay.ports, rec)
        spawned[name] = spawn(name, server_cmd(name, host, rec[key], cfg, lay),
                              server_env(name, lay, rec["postgres_port"]), lay)
    for name, pid in spawned.items():
        key = f"{name}_port"
        try:
            wait_healthy(name, pid, health_url(name, host, rec[key]), lay, cfg.start_timeout_s)
        except ServiceError:
            for other, other_pid in spawned.items():  # leave nothing half-up behind a failure
                if other != name and read_pid(lay.pid(other)) == other_pid:
                    stop_group(other_pid)
            raise
        started = True
        yield f"{name}: started at {url(name, host, rec[key])} (pid {pid}, log {lay.log(name)})"
    if not started:
        yield f"services: already running (state {lay.root})"
    yield from exports(rec)


def status(lay: Layout) -> list[str]:
    rec = _recorded(lay)
    pg = postgres_pid(lay) if pg_bin("pg_ctl") else None
    lines = [f"postgres: {'running' if pg else 'stopped'}  pid {pg or '-'}  "
             f"postgresql://{PG_USER}@127.0.0.1:{rec.get('postgres_port', '-')}"]
    for name in SERVERS:
        pid = read_pid(lay.pid(name))
        where = url(name, rec["host"], rec[f"{name}_port"]) if rec.get(f"{name}_port") else "-"
        lines.append(f"{name}: {'running' if pid else 'stopped'}  pid {pid or '-'}  {where}")
    return lines


def running(lay: Layout) -> dict[str, int | None]:
    """Each service's pid, None when stopped."""
    return {"postgres": postgres_pid(lay) if pg_bin("pg_ctl") else None,
            **{name: read_pid(lay.pid(name)) for name in SERVERS}}


def down(lay: Layout) -> Iterator[str]:
    """Stop what `up` started: the two servers by pid file (verified to be that very process), then the
    cluster with pg_ctl stop. A stale pid file is removed, its pid left alone."""
    for name in reversed(SERVERS):
        path = lay.pid(name)
        pid = read_pid(path)
        if pid is None:
            yield f"{name}: not running" + (" (stale pid file removed)" if path.exists() else "")
        else:
            stop_group(pid)
            yield f"{name}: stopped (pid {pid})"
        path.unlink(missing_ok=True)
    pid = postgres_pid(lay) if pg_bin("pg_ctl") else None
    if pid is None:
        yield "postgres: not running"
    else:
        stop_postgres(lay)
        yield f"postgres: stopped (pid {pid})"
