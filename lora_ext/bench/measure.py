"""Timing and the memory-bandwidth limit, shared by both benchmarks."""

import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def median_seconds(fn, min_time=0.3, min_runs=5):
    """Median wall time of fn() over repeated runs (CUDA work synchronized around each run)."""
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(samples) < min_runs:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_bandwidth(device):
    """Bytes per second the device's memory delivers.

    CPU: the best of three streaming reads of 1 GiB (sum, max, and a matrix-vector product, which
    MKL streams fastest). CUDA: a device-to-device copy of 1 GiB, counting bytes read and written.
    """
    device = torch.device(device)
    n = (1 << 30) // 4
    if device.type == "cpu":
        x = torch.ones(n)
        matrix, vector = x.view(-1, 4096), torch.ones(4096)
        probes = [lambda: x.sum(), lambda: x.amax(), lambda: torch.mv(matrix, vector)]
        return max(n * 4 / median_seconds(probe, min_time=1.0) for probe in probes)
    x = torch.ones(n, device=device)
    y = torch.empty_like(x)
    return 2 * n * 4 / median_seconds(lambda: y.copy_(x), min_time=0.5)


class BandwidthProbe:
    """A short read of 256 MiB (CPU: matrix-vector product, the fastest probe of measure_bandwidth;
    CUDA: a device-to-device copy): bytes per second now, to see whether the machine's bandwidth
    moved during a run (on a shared machine, other tenants take some of it)."""

    def __init__(self, device):
        self.device = torch.device(device)
        n = (256 << 20) // 4
        if self.device.type == "cpu":
            self.matrix, self.vector = torch.ones(n // 4096, 4096), torch.ones(4096)
        else:
            self.src = torch.ones(n, device=self.device)
            self.dst = torch.empty_like(self.src)

    def __call__(self):
        best = 0.0
        for _ in range(3):
            if self.device.type == "cpu":
                t0 = time.perf_counter()
                torch.mv(self.matrix, self.vector)
                best = max(best, self.matrix.numel() * 4 / (time.perf_counter() - t0))
            else:
                torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                self.dst.copy_(self.src)
                torch.cuda.synchronize(self.device)
                best = max(best, 2 * self.src.numel() * 4 / (time.perf_counter() - t0))
        return best


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device):
    """The setup a result belongs to: machine, software, build, commit, threads, date."""
    import lora_ext

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "build": lora_ext.build_info(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "platform": platform.platform(), "commit": git_commit()}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, sm_count=props.multi_processor_count)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        try:
            with open("/proc/cpuinfo") as f:
                info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                                   platform.processor())
        except OSError:
            info["cpu"] = platform.processor()
    return info
