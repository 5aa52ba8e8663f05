"""What machine this is: the CPU's model name for the figures benchmarks print beside their reference, and the
hardware facts every stage run records (MLflow tags `host.*`), so two runs' speeds compare in the UI.

    from lmpipe.host import cpu_model, hardware
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from lmpipe.names import POOL_ENV

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "sve", "asimd")
"""The CPU flags that decide how fast torch's CPU kernels run (bf16 autocast pays only with avx512_bf16/AMX)."""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform.processor(), else 'unknown CPU'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The ISA_FLAGS this CPU has (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ISA_FLAGS if f in have]
    except OSError:
        pass
    return []


def hardware(choice: str = "auto") -> dict[str, str]:
    """The facts that make two runs' speeds comparable: host, device kind/name/count/memory (CUDA and cuDNN
    versions on a GPU; CPU model, ISA flags and cores on a CPU), torch and transformers versions, and the
    Prefect pool and worker the run came from. Keys are MLflow tag names. A process that has not imported torch (clean,
    tokenize: they start without it) is a CPU run and does not import it for this. `choice`: common.device
    (env LMPIPE_DEVICE wins, as for the stages themselves)."""
    torch = sys.modules.get("torch")
    on_gpu = torch is not None and torch.cuda.is_available() and (os.environ.get("LMPIPE_DEVICE") or choice) != "cpu"

    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "none"

    facts = {"host.name": socket.gethostname(), "host.pool": os.environ.get(POOL_ENV, ""),
             "host.worker": os.environ.get("PREFECT__WORKER_NAME", ""),  # set by a Prefect worker for its runs
             "host.device": "cuda" if on_gpu else "cpu", "host.torch": installed("torch"),
             "host.transformers": installed("transformers"), "host.cpu": cpu_model(),
             "host.cpu_flags": " ".join(cpu_flags()) or "none",
             "host.cpu_cores": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())}
    if torch is not None:
        facts["host.torch_threads"] = str(torch.get_num_threads())
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        facts.update({"host.gpu": props.name, "host.gpu_count": str(torch.cuda.device_count()),
                      "host.gpu_memory_gib": f"{props.total_memory / 2**30:.1f}",
                      "host.cuda": str(torch.version.cuda), "host.cudnn": str(torch.backends.cudnn.version())})
    return facts
