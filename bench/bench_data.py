"""QM9 data timings: cold parse (qm9pack CSV -> cache, into a fresh temporary data directory) and warm load
(verified cache). Run: .venv/bin/python -m bench.bench_data [--repeats 3]"""

import argparse
import os
import platform
import tempfile
import time

import dimezbl as dz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as data_dir:
        cold = []
        for _ in range(args.repeats):
            for name in os.listdir(data_dir):
                os.unlink(os.path.join(data_dir, name))
            start = time.perf_counter()
            dataset = dz.load_qm9(data_dir)
            cold.append(time.perf_counter() - start)
        warm = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            dataset = dz.load_qm9(data_dir)
            warm.append(time.perf_counter() - start)
        size_mb = os.path.getsize(os.path.join(data_dir, dz.QM9_CACHE_FILE)) / 1e6
    print(f"QM9 molecules: {len(dataset)}; cache file {size_mb:.1f} MB")
    cold_all, warm_all = ", ".join(f"{t:.2f}" for t in cold), ", ".join(f"{t:.3f}" for t in warm)
    print(f"QM9 cold parse + cache write: best {min(cold):.2f} s, all {cold_all} s (limit 60 s)")
    print(f"QM9 warm load (sha256-verified): best {min(warm):.3f} s, all {warm_all} s (limit 5 s)")
    start = time.perf_counter()
    for i in range(10_000):
        dataset[i]
    print(f"QM9 item access: {(time.perf_counter() - start) / 10_000 * 1e6:.1f} us per Data object")


if __name__ == "__main__":
    main()
