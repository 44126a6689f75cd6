"""Process-level settings shared by the training entry points."""
from __future__ import annotations


def keep_freed_memory() -> bool:
    """Tells glibc malloc to serve big blocks from its heap and keep freed memory.

    Dynamic layers build large temporaries every step (per-sample conv weights
    ``(B, *S)`` of hundreds of MB; all experts' mixed weights ``(E, out, in)``);
    by default glibc maps every block above 32 MB fresh from the kernel and unmaps it
    when freed, so each step pays page faults to zero gigabytes again (measured on
    2 CPU cores: ResNet-10 PAD-DY-Conv at 28 px, batch 64, 11 s/step before, 1.6 s
    after).  Returns False where this is not glibc.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def machine_description() -> str:
    """One line naming where a run computes, recorded with its results, e.g.
    ``"cpu: Intel(R) Xeon(R) ... (2 cores, 2 torch threads), torch 2.14.1"`` or
    ``"cuda: NVIDIA H100 80GB HBM3 x1, torch 2.14.1"``."""
    import os
    import platform

    import torch
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"
    model = platform.processor() or platform.machine() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {model} ({cores} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}"


def code_version() -> str:
    """The git commit of this repository's code, recorded with a run's results: ``"da95647"``, with
    ``"+modified"`` when tracked files differ from it, or ``"unknown"`` outside a git checkout."""
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=30)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode != 0 or status.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+modified" if status.stdout.strip() else "")
