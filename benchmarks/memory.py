"""Peak memory of one pass over the full CIFAR-10 training split: streamed from shards vs loaded from the folder.

Every variant runs in a fresh subprocess (so peaks do not mix) and reports its peak resident set size
(VmHWM from /proc/self/status; ru_maxrss agrees) after one epoch of shuffled 128-image batches of
MobileNet inputs (--size, float32):

- baseline: TensorFlow imported and the data set opened, no pixels read (the floor every variant pays);
- shards, streamed: ``make_pipeline`` on the shard directory (``edgesmith data shard``): interleaved
  reads, a shuffle buffer of encoded records, nothing cached;
- folder, uint8 cache: ``make_pipeline(cache=True)`` on the image folder, as the trainer runs it:
  decoded uint8 images at their stored size kept in memory;
- folder, float32 in RAM: the whole split decoded and resized into one float32 array (``load_pixels``,
  what bench does with the test split, and what the folder pipeline's cache held before it kept uint8).

    python benchmarks/memory.py [--data ../shared/data/cifar10] [--shards DIR] [--size 96]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("baseline", "shards, streamed", "folder, uint8 cache", "folder, float32 in RAM")


def peak_rss_mb() -> tuple[float, float]:
    """(VmHWM, ru_maxrss) of this process in MB."""
    status = Path("/proc/self/status").read_text()
    hwm_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return hwm_kb / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant: str, data: Path, shards: Path, size: int) -> dict:
    """Run one variant in this process and return its numbers."""
    import edgesmith._keras  # noqa: F401
    from edgesmith.data.datasets import image_folder
    from edgesmith.data.pipeline import load_pixels, make_pipeline
    from edgesmith.data.shards import shard_dataset
    from edgesmith.data.spec import PreprocessSpec

    spec = PreprocessSpec((size, size), "tf")
    split = (shard_dataset(shards) if variant.startswith("shards") else image_folder(data)).train
    started, images = time.perf_counter(), 0
    if variant == "folder, float32 in RAM":
        pixels, _ = load_pixels(split, spec.input_size)
        images = len(spec.normalize(pixels))
    elif variant != "baseline":
        pipeline = make_pipeline(split, spec, batch_size=128, shuffle_seed=0, cache=not variant.startswith("shards"))
        images = sum(int(labels.shape[0]) for _, labels in pipeline)
    hwm, maxrss = peak_rss_mb()
    return {"variant": variant, "images": images, "seconds": time.perf_counter() - started,
            "vmhwm_mb": hwm, "ru_maxrss_mb": maxrss}


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--variant", variant, "--data", str(args.data), "--shards", str(args.shards),
               "--size", str(args.size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"variant": variant, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cifar10")
    parser.add_argument("--shards", type=Path, help="shard directory of --data (written to a temp dir if absent)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.data, args.shards, args.size)))
        return
    with tempfile.TemporaryDirectory(prefix="edgesmith-memory-") as tmp:
        if args.shards is None:
            from edgesmith.data.shards import write_shards

            args.shards = Path(tmp) / "shards"
            write_shards(args.data, args.shards)
        rows = [run_variant(variant, args) for variant in VARIANTS]
    print(f"one epoch over the CIFAR-10 training split, {args.size}x{args.size} MobileNet inputs, batches of 128")
    print(f"{'variant':<24} {'images':>7} {'seconds':>8} {'peak RSS MB':>12} {'above baseline MB':>18}")
    floor = rows[0].get("vmhwm_mb", 0.0)
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<24} failed: {row['error']}")
            continue
        print(f"{row['variant']:<24} {row['images']:>7} {row['seconds']:>8.1f} {row['vmhwm_mb']:>12.0f} "
              f"{row['vmhwm_mb'] - floor:>18.0f}")
    print("peak RSS: VmHWM of each variant's own process (ru_maxrss agrees within a few MB)")


if __name__ == "__main__":
    main()
