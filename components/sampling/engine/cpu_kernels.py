"""The compiled CPU decode-attention kernel (`cpu_attention.cpp`), built on first use.

`decode_attention()` returns the kernel's module, or None where it cannot be built (no C++ compiler, or
`ARBORL_CPU_KERNELS=0`); callers then use plain torch operations, which compute the same thing, slower. The
build takes ~20 s once per CPU model, checkout and source version (torch caches it under `TORCH_EXTENSIONS_DIR`,
by default ~/.cache/torch_extensions; `make install` builds it) and is tuned for the CPU it runs on
(`-march=native`; the build's name carries a hash of the CPU's model and flags, so a home directory shared by
different machines never loads a build made for another CPU). OpenMP comes from the runtime torch already
loaded, so the kernel shares torch's threads instead of starting a second pool.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("cpu_attention.cpp")
ENV_SWITCH = "ARBORL_CPU_KERNELS"  # "0" turns the compiled kernel off

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pip package's binary sits beside this interpreter's scripts."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def cpu_tag() -> str:
    """A short hash of this CPU's model name and instruction-set flags (Linux), else of what `platform` reports."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        text += "".join(dict.fromkeys(lines))  # the first of each distinct line: the same on every core
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def build_name() -> str:
    """The extension's name: per CPU (`cpu_tag`) and per checkout, since torch's build directory holds absolute
    source paths and two checkouts sharing one name would rebuild over each other on every switch."""
    checkout = hashlib.sha256(str(SOURCE.resolve()).encode()).hexdigest()[:6]
    return f"arborl_cpu_attention_{cpu_tag()}_{checkout}"


def decode_attention() -> ModuleType | None:
    """The built kernel module (with `decode_attention(q, new_k, new_v, keys, values, column, bias)`), or None."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
        return _state["module"]


def _build() -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import load

        _ninja_on_path()
        return load(
            name=build_name(),
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, an unsupported platform: fall back, say why once
        log.warning("CPU decode-attention kernel unavailable (%s: %s); using torch operations instead "
                    "(set %s=0 to skip the build)", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                    ENV_SWITCH)
        return None
