"""torch.compile on CPU: the C++ compiler check and the on-disk caches (inductor's FX-graph cache, AOTAutograd's
cache, the vector-ISA record) in one folder per machine, ~/.cache/lmpipe/torch-compile by default.

    from lmpipe.compile_cache import compile_cache; compile_cache()   # before the first compiled call
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import torch

from lmpipe.errors import ConfigError
# Imported inside functions (start-up cost, docs/results.md#start-up): torch._inductor / torch._dynamo where used:
# their config reads TORCHINDUCTOR_CACHE_DIR when first imported, so compile_cache() sets it first.


def check_compile(compiled: bool, device: str) -> None:
    """torch.compile's CPU backend (inductor) builds C++ kernels: refuse early, in one line, without a compiler."""
    if compiled and device == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        raise ConfigError("pretrain.compile: torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH; "
                          "install one or set pretrain.compile=false")


COMPILE_CACHE_ENV = "LMPIPE_COMPILE_CACHE"


def compile_cache() -> Path:
    """torch.compile's on-disk caches (inductor's FX-graph cache and AOTAutograd's cache) in one folder per
    machine, outside every DVC output, so a second process with the same shapes loads its kernels instead of
    compiling them: $LMPIPE_COMPILE_CACHE, else $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/lmpipe/torch-compile.
    PyTorch keys each entry by the graph, its input shapes and dtypes, the torch version and the compile
    settings: a changed model shape compiles anew and never loads another shape's artifact."""
    import torch._functorch.config
    import torch._inductor.config

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmpipe" / "torch-compile"
    # importing transformers' Trainer already runs inductor's cache_dir(), which *sets* TORCHINDUCTOR_CACHE_DIR
    # to torch's own temp-folder default: that value is torch's choice, not the user's, and is ignored here
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if inductor and os.path.abspath(inductor) == os.path.abspath(default_cache_dir()):
        inductor = None
    folder = Path(os.environ.get(COMPILE_CACHE_ENV) or inductor or base).expanduser()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    # a graph that enters autocast (Trainer's bf16 wraps the compiled forward in it) is refused by AOTAutograd's
    # cache, which then re-traces and re-partitions the joint graph in every process (seconds); the two
    # functions take their device and dtype as graph constants, which are in the key, so they are safe to cache
    # (torch's own switch for this; keyed by the torch version)
    torch._inductor.config.unsafe_marked_cacheable_functions = {
        **torch._inductor.config.unsafe_marked_cacheable_functions,
        **{f"torch.amp.autocast_mode.{f}": torch.__version__ for f in ("_enter_autocast", "_exit_autocast")}}
    _skip_known_vec_isa_checks(folder)
    return folder


def _claimed_vec_isas() -> list[str] | None:
    """The vector ISAs inductor would use on this x86 CPU, by its flags; None off x86 or when unknown."""
    try:
        from torch._inductor import cpu_vec_isa

        if platform.machine() not in ("x86_64", "AMD64"):
            return None
        flags = cpu_vec_isa.x86_isa_checker()
        return [str(i) for i in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(i).split())]
    except Exception:  # a torch without these internals: keep inductor's checks
        return None


def _vec_isa_record(folder: Path, claimed: list[str]) -> Path | None:
    """Inductor checks each vector ISA the CPU claims by compiling a test library and loading it in a child
    Python, in every process (about a second on 2 cores). This file records that every check passed on this
    machine with this compiler and torch (its name hashes the claimed ISAs, the compiler binary and the torch
    version); when present, the checks are skipped (inductor's own vec_isa_ok)."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    compiler = shutil.which(get_cpp_compiler())
    if compiler is None:  # no C++ compiler (a CUDA-only host): nothing to record
        return None
    compiler = os.path.realpath(compiler)
    st = os.stat(compiler)
    key = json.dumps([torch.__version__, claimed, compiler, st.st_size, st.st_mtime_ns])
    return folder / f"vec-isa-checked-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _skip_known_vec_isa_checks(folder: Path) -> None:
    """The first compiled process on a machine runs inductor's checks now and writes the record when every
    claimed ISA passed; from then on every process (this one included) sets vec_isa_ok, so all of them compile
    with the same inductor settings and share cache entries."""
    import torch._inductor.config

    claimed = _claimed_vec_isas()
    record = None if claimed is None else _vec_isa_record(folder, claimed)
    if record is None:
        return
    if not record.is_file():
        from torch._inductor import cpu_vec_isa

        if [str(i) for i in cpu_vec_isa.valid_vec_isa_list()] != claimed:
            return  # a claimed ISA failed its check here: inductor keeps checking, and picks among those that pass
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"torch": torch.__version__, "isa": claimed}) + "\n")
        except OSError:  # a read-only cache folder: inductor keeps checking in every process
            return
    torch._inductor.config.cpp.vec_isa_ok = True


def compile_cache_counts() -> dict[str, int]:
    """Compiled graphs this process loaded from the cache vs compiled (torch's own counters)."""
    from torch._dynamo.utils import counters

    return {"compile_graphs_cached": int(counters["inductor"]["fxgraph_cache_hit"]),
            "compile_graphs_compiled": int(counters["inductor"]["fxgraph_cache_miss"]),
            # AOTAutograd's cache: a hit also skips tracing and partitioning the joint forward/backward graph
            "compile_autograd_cached": int(counters["aot_autograd"]["autograd_cache_hit"]),
            "compile_autograd_bypassed": int(counters["aot_autograd"]["autograd_cache_bypass"])}
