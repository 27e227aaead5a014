"""Names of the hardware a cost set was measured on: the cost-set key of a CUDA device (:func:`gpu_kind`) and the
host CPU model (:func:`cpu_model_name`), recorded in each cost set's provenance by :mod:`graphs.profile`."""

from __future__ import annotations

import re


def gpu_kind(device_name: str) -> str:
    """Cost-set key of a CUDA device from its name: the model number (``NVIDIA H200`` -> ``H200``,
    ``Tesla V100-SXM2-16GB`` -> ``V100``), so a cluster's ``Device(kind="H200")`` finds measured costs."""
    m = re.search(r"\b([A-Z]{1,2}\d{1,4}[A-Z]?)\b", device_name.replace("-", " "))
    return m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") or "cuda"


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo ('' when unavailable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
