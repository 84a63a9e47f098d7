"""A bounded load test of ``streamgpen serve``'s photo endpoint, on loopback only.

Starts ``python -m streamgpen serve`` (the model and detector given, CPU by default), then
``--clients`` threads post a photo in a loop for ``--seconds``. Reports latency p50/p95/p99,
requests per second, device batches and faces per batch (from ``/metrics``), and the server's
resident memory sampled every second: its growth over the second half of the run (flat when
nothing accumulates per request). Writes the figures as JSON.

    python benchmarks/serve_load.py --seconds 60 --clients 8 \
        --json benchmarks/results/serve-load-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import cv2
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main() -> None:
    args = _arguments()
    photo = _photo(args.photo)
    with TemporaryDirectory() as spool:
        server, base = _serve(args, Path(spool))
        try:
            figures = _load(base, photo, server.pid, args)
        finally:
            server.terminate()
            server.wait(timeout=60)
    figures["command"] = " ".join(sys.argv)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--photo", type=Path, default=None, help="default: a part of Solvay")
    parser.add_argument("--model", default="identity")
    parser.add_argument("--detector", default="retinaface_mobile0.25")
    parser.add_argument("--weights-dir", type=Path, default=SHARED / "weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def _photo(path: Path | None) -> bytes:
    """The photo posted: by default 332x142 of the Solvay photo (a dozen small faces)."""
    if path is not None:
        return path.read_bytes()
    image = cv2.imread(str(SHARED / "media" / "Solvay_conference_1927.png"))
    part = cv2.resize(image, (664, 284), interpolation=cv2.INTER_AREA)[:142, :332]
    return cv2.imencode(".png", part)[1].tobytes()


def _serve(args: argparse.Namespace, spool: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "streamgpen", "serve", "--port", "0", "-q"]
    cmd += ["--model", args.model, "--detector", args.detector, "--mask", "box"]
    cmd += ["--weights-dir", str(args.weights_dir), "--device", args.device, "--spool", str(spool)]
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in process.stderr:
        match = re.search(r"serving on (http://\S+?)/? ", line)
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep it drained
            return process, match.group(1)
    raise SystemExit("streamgpen serve did not start")


def _load(base: str, photo: bytes, pid: int, args: argparse.Namespace) -> dict:
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds

    def client() -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                response = http.post("/v1/enhance", files={"file": ("p.png", photo, "image/png")})
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies if response.status_code == 200 else failures).append(
                        elapsed if response.status_code == 200 else response.status_code
                    )

    httpx.post(f"{base}/v1/enhance", files={"file": ("p.png", photo, "image/png")}, timeout=120)
    memory = _Sampler(pid)
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    memory.stop()
    metrics = httpx.get(f"{base}/metrics").text
    return _figures(latencies, failures, wall, memory.samples, metrics, args)


def _figures(latencies, failures, wall, rss, metrics: str, args) -> dict:
    ms = np.array(latencies) * 1e3
    half = rss[len(rss) // 2 :]
    batches = _metric(metrics, "streamgpen_device_batches_total")
    faces = _metric(metrics, "streamgpen_faces_total")
    return {
        "device": args.device,
        "machine": f"{platform.processor() or platform.machine()}, {_cores()} cores",
        "model": args.model,
        "detector": args.detector,
        "clients": args.clients,
        "seconds": round(wall, 1),
        "requests": len(latencies),
        "failed": len(failures),
        "requests_per_s": round(len(latencies) / wall, 2),
        "latency_ms": {q: round(float(np.percentile(ms, p)), 1) for q, p in
                       (("p50", 50), ("p95", 95), ("p99", 99))},
        "device_batches": batches,
        "faces": faces,
        "faces_per_batch": round(faces / batches, 2) if batches else None,
        "rss_mib_first_last": [round(rss[0] / 2**20, 1), round(rss[-1] / 2**20, 1)],
        "rss_mib_growth_second_half": round((max(half) - min(half)) / 2**20, 1),
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


class _Sampler:
    """The server's resident memory, once a second, on a thread."""

    def __init__(self, pid: int):
        self.pid, self.samples = pid, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            status = Path(f"/proc/{self.pid}/status").read_text()
            self.samples.append(int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


if __name__ == "__main__":
    main()
