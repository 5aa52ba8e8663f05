"""Where the input data lives on this machine: a DVC remote named `lmpipe-data`, not a param.

    lmpipe data link /data/lmpipe      # once per checkout; `make run` links the default (or $LMPIPE_DATA_DIR)
    lmpipe data show                   # the linked folder and DVC's hash of it

The clean stage depends on `remote://lmpipe-data` (dvc.yaml), so no stage's params or dependency path
names a machine path: two checkouts at different paths with the same data get identical dvc.lock
entries, and DVC's run cache serves one from the other's results. DVC hashes the folder's content
(a `.dir` hash in dvc.lock), so changed data re-runs clean.

The URL is machine-local configuration. `.dvc/config` (committed) carries the default, `../shared/data`
beside the checkout; `lmpipe data link` writes the absolute path into `.dvc/config.local` (git-ignored),
which DVC copies into the temporary workspaces of `dvc exp run --temp` and `--queue`, so queued
experiments read the same data.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmpipe.errors import ConfigError
# Imported inside functions (start-up cost, docs/results.md#start-up): dvc.config where used: `lmpipe data link` needs
# it, the other datasource calls do not.

REMOTE = "lmpipe-data"
DEP = f"remote://{REMOTE}"
ENV = "LMPIPE_DATA_DIR"
DEFAULT = Path("..") / "shared" / "data"  # relative to the checkout


def _config(root: Path):
    from dvc.config import Config

    return Config(dvc_dir=str(root / ".dvc"), validate=False)


def configured(root: Path) -> Path | None:
    """The folder DVC's `lmpipe-data` remote points at in this checkout (config.local wins), or None."""
    if not (root / ".dvc").is_dir():
        return None
    url = _config(root).get("remote", {}).get(REMOTE, {}).get("url")
    if not url:
        return None
    path = Path(url)
    # DVC stores relative URLs relative to the config file's folder (.dvc/)
    return (path if path.is_absolute() else root / ".dvc" / path).resolve()


def data_dir(root: Path) -> Path:
    """The data folder a stage reads: env LMPIPE_DATA_DIR, else the linked remote, else ../shared/data.

    Under DVC (`dvc repro`, `dvc exp run`) the env var must name the folder DVC hashes, or DVC could serve
    results computed from other data; the stage refuses in one line otherwise."""
    linked = configured(root)
    env = os.environ.get(ENV)
    if env:
        path = Path(env).expanduser().resolve()
        if os.environ.get("DVC_STAGE") and linked is not None and linked != path:
            raise ConfigError(f"{ENV} ({path}) differs from the data DVC tracks ({linked}, remote {REMOTE}); "
                              f"run `lmpipe data link {path}` or unset {ENV}")
        origin = ENV
    elif linked is not None:
        path, origin = linked, f"DVC remote {REMOTE} (lmpipe data link PATH)"
    else:
        path, origin = (root / DEFAULT).resolve(), f"default {DEFAULT}"
    if not path.is_dir():
        raise ConfigError(f"data directory {path} does not exist ({origin})")
    return path


def link(root: Path, path: str | Path) -> Path:
    """Point this checkout's `lmpipe-data` remote at `path` (absolute, in .dvc/config.local)."""
    target = Path(path).expanduser().resolve()
    if not target.is_dir():
        raise ConfigError(f"data directory {target} does not exist")
    if not (root / ".dvc").is_dir():
        raise ConfigError(f"{root}: not a DVC repository (run `dvc init` first)")
    conf = _config(root)
    with conf.edit("local") as local:
        local.setdefault("remote", {})[REMOTE] = {"url": str(target)}
    return target


def link_default(root: Path) -> Path:
    """Link $LMPIPE_DATA_DIR, else what the checkout already points at, else ../shared/data."""
    env = os.environ.get(ENV)
    return link(root, env or configured(root) or (root / DEFAULT))
