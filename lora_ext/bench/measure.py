"""Timing, the memory-bandwidth limit and the machine's description, shared by `lora-ext bench`,
benchmarks/bench_kernels.py and benchmarks/bench_fused_linear.py."""

import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def seconds(fn, *args, device=None):
    """(fn(*args), wall seconds it took); with a CUDA device, its work is synchronized before and
    after, so the time covers the work and not only its launch."""
    sync = _synchronizer(device)
    sync()
    t0 = time.perf_counter()
    result = fn(*args)
    sync()
    return result, time.perf_counter() - t0


def median_seconds(fn, inputs=None, min_time=0.3, min_runs=5, device=None):
    """Median wall seconds of one call of fn() or, with `inputs`, of fn(x), cycling through them in
    whole passes (so that a working set larger than the last-level cache is read cold), over at
    least min_time seconds and min_runs calls, after one warm-up call. With a CUDA device each
    call is synchronized (see seconds())."""
    calls = [()] if inputs is None else [(x,) for x in inputs]
    fn(*calls[0])
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(samples) < min_runs:
        for args in calls:
            samples.append(seconds(fn, *args, device=device)[1])
    return statistics.median(samples)


def interleaved_rounds(calls, rounds, before_round=None):
    """Runs every call of {name: call} once per round, in turn, for one warm-up round and then
    `rounds` rounds, so that drift in the machine's speed hits all of them alike.

    Returns {name: [what the call returned in each round after the warm-up]}, and under
    "before_round" what before_round() returned ahead of each of those rounds (if given).
    """
    results = {name: [] for name in calls}
    if before_round is not None:
        results["before_round"] = []
    for round_index in range(rounds + 1):
        if before_round is not None and round_index > 0:
            results["before_round"].append(before_round())
        for name, call in calls.items():
            result = call()
            if round_index > 0:
                results[name].append(result)
    return results


def median_interleaved(fns, rounds, device=None):
    """{name: median seconds of fn()} with the fns timed in interleaved rounds (interleaved_rounds)."""
    times = interleaved_rounds({name: (lambda f=fn: seconds(f, device=device)[1]) for name, fn in fns.items()},
                               rounds)
    return {name: statistics.median(t) for name, t in times.items()}


def cuda_event_seconds(fn, inputs, reps, graph=False):
    """Median seconds per call of fn(x) over the inputs, timed with CUDA events over `reps` passes.

    graph=False: back-to-back launches (launch overhead included). graph=True: one CUDA graph of a
    pass over the inputs, replayed (no launch gaps from the host: the device time of the kernels).
    """
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for x in inputs:
                fn(x)
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            for x in inputs:
                fn(x)
        one_pass = cuda_graph.replay
    else:
        def one_pass():
            for x in inputs:
                fn(x)
    one_pass()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one_pass()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / len(inputs))
    return statistics.median(samples)


def _synchronizer(device):
    if device is not None and torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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
    return 2 * n * 4 / median_seconds(lambda: y.copy_(x), min_time=0.5, device=device)


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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP_FREED = {_M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: (1 << 31) - 1, _M_TOP_PAD: 64 << 20}


def keep_freed_memory():
    """Asks glibc's allocator to keep freed memory for reuse instead of handing it back to the
    system, so that a prefill's large activations are not faulted in page by page again on every
    forward. Without it, glibc maps every allocation above its (adaptive) threshold afresh and
    trims the heap top after large frees: a bfloat16 prefill of 8 prompts of 512 tokens on the
    bench model took 290-680 ms from round to round, against 260-330 ms with it (NOTES.md). It
    speeds the base and the patched model alike; the CPU runtimes Intel recommends (jemalloc,
    tcmalloc) behave this way by default. Returns a description for the results' setup, or
    None where the C library is not glibc (nothing is changed there)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    accepted = {param: bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
                for param, value in _KEEP_FREED.items()}
    if not all(accepted.values()):
        return None
    return "glibc mallopt: mmap threshold 1 GiB, trim threshold 2 GiB, top pad 64 MiB"


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
