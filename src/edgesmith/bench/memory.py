"""Peak memory of one artifact: resident set size (RSS) while it is loaded and run, in a fresh process.

Why a fresh process: measured inside the bench process, the numbers would depend on what ran before
(TensorFlow already imported by an earlier Keras row, allocator pools kept from an earlier artifact),
so the same file would get a different figure in a different report order. The child process imports
the runtime, records its RSS (``rss_before_load_bytes``: Python, NumPy and the runtime library), resets
the kernel's high-water mark (``/proc/self/clear_refs`` = 5, Linux 4.0+), loads the model with the
bench's threads, device and batch handling, and runs each batch size a few times in increasing order;
after each it reads ``VmHWM`` from ``/proc/self/status``: the peak RSS of loading plus running up to
that batch size. Where the reset is refused the peak includes the runtime's import (``hwm_reset`` false).

RSS is host memory: memory on a GPU is not in it. Linux only; elsewhere nothing is measured.

    python -m edgesmith.bench.memory '{"path": "m.tflite", "batch_sizes": [1, 8], "threads": 2}'
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
CALLS_PER_BATCH = 3
CHILD_TIMEOUT_S = 600


def status_bytes(key: str, status: Path = STATUS) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None where there is none."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak(clear_refs: Path = CLEAR_REFS) -> bool:
    """Reset this process's RSS high-water mark to its current RSS; False where the kernel refuses."""
    try:
        clear_refs.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_in_child(path: Path, *, batch_sizes: list[int], threads: int, device: str = "cpu",
                      providers: list[str] | None = None) -> dict[str, Any] | None:
    """Run :func:`measure` on ``path`` in a fresh Python process; None (logged) when it cannot be measured.

    Returns:
        ``{"rss_before_load_bytes": int, "hwm_reset": bool, "peak_rss_bytes": {batch: int}}``.
    """
    if status_bytes("VmHWM") is None:
        return None
    spec = {"path": str(path), "batch_sizes": sorted(set(batch_sizes)), "threads": threads, "device": device,
            "providers": providers or None}
    try:
        done = subprocess.run([sys.executable, "-m", "edgesmith.bench.memory", json.dumps(spec)],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        log.warning("peak memory of %s: no answer after %d s; not measured", path, CHILD_TIMEOUT_S)
        return None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        log.warning("peak memory of %s not measured: %s", path, (done.stderr.strip().splitlines() or ["?"])[-1])
        return None
    result = json.loads(lines[-1])
    result["peak_rss_bytes"] = {int(k): v for k, v in result["peak_rss_bytes"].items()}
    return result


def measure(path: str | Path, *, batch_sizes: list[int], threads: int, device: str = "cpu",
            providers: list[str] | None = None) -> dict[str, Any]:
    """In this process: RSS before loading, then the peak after loading and running each batch size."""
    from edgesmith.runtime import import_runtime, load_runner

    import_runtime(path)
    before = status_bytes("VmRSS")
    reset = reset_peak()
    runner = load_runner(path, threads=threads, device=device, providers=providers)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in runner.sample_shape]
    peaks = {}
    for batch in sorted(set(batch_sizes)):
        call = runner.latency_call(np.zeros((batch, *shape), np.float32))
        for _ in range(CALLS_PER_BATCH):
            call()
        peaks[batch] = status_bytes("VmHWM")
    return {"rss_before_load_bytes": before, "hwm_reset": reset, "peak_rss_bytes": peaks}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    print(json.dumps(measure(spec["path"], batch_sizes=spec["batch_sizes"], threads=spec["threads"],
                             device=spec.get("device", "cpu"), providers=spec.get("providers"))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
