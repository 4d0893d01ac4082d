"""What a result was measured on: the machine, its load, and the auxlab code."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_description(device: torch.device) -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    info = {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "torch": torch.__version__,
        "torch threads": f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
        info["CUDA"] = str(torch.version.cuda)
    return info


def auxlab_version() -> str:
    """auxlab's version, and the git commit of its checkout (with '+ local changes' if auxlab/ differs from it)."""
    import subprocess

    import auxlab

    root = Path(auxlab.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "auxlab"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return auxlab.__version__
    return f"{auxlab.__version__}, git {commit}{' + local changes in auxlab/' if dirty else ''}"


def loadavg() -> tuple[float, float, float] | None:
    """The system load average over 1, 5 and 15 minutes, where the platform has one."""
    try:
        return os.getloadavg()
    except OSError:
        return None
