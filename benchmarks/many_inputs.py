"""Several live inputs in one process against one process per input.

Plays ``--inputs`` copies of the sample, looped ``--loops`` times (its packets copied with their
timestamps moved on: no re-encode), as ``--realtime`` inputs (each read at its own frame rate,
as a camera delivers it) through ``streamgpen enhance IN1 IN2 ... -o null``, then the same copies
as that many separate processes at once. Per input: frames written, dropped, fps, latency p95
(from each run's closing lines); for the single process also the device batches (face logs):
faces per batch and how many held faces of more than one input. Writes the figures as JSON.

    python benchmarks/many_inputs.py --inputs 1 2 3 4 \
        --json benchmarks/results/many-inputs-cpu.json

Defaults are the CPU recipe (GPEN-BFR-256 random weights would measure GPEN's cost on a CPU
only; the identity model shows what sharing the device worker costs and saves in the pipeline:
detection, tracking, paste, encode), mobilenet, box mask.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = ROOT / "samples" / "solvay_pan.mp4"
MOBILENET = "detection_mobilenet0.25_Final.pth"
# A run's closing line (one per input, "NAME: " first when there are several).
LINE = re.compile(
    r"^(?:(?P<name>\S+): )?(?P<frames>\d+) frames, (?P<rate>[\d.]+) (?P<unit>fps|s/frame), "
    r".*?dropped (?P<dropped>\d+)(?:, p95 (?P<p95>\d+) ms)?"
)


def main() -> None:
    args = _arguments()
    results = []
    with TemporaryDirectory() as work:
        work = Path(work)
        weights = work / "weights"
        weights.mkdir()
        shutil.copy(SHARED / "weights" / MOBILENET, weights / MOBILENET)
        looped = _looped(SAMPLE, work / "looped.mp4", args.loops)
        for count in args.inputs:
            clips = _copies(looped, work / f"in{count}", count)
            one = _one_process(clips, weights, work / f"faces{count}", args.extra)
            separate = _separate_processes(clips, weights, args.extra)
            results.append({"inputs": count, "one_process": one, "separate_processes": separate})
            print(json.dumps(results[-1]), flush=True)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "date": time.strftime("%Y-%m-%d"),
        "clip": f"{SAMPLE.name} looped {args.loops}x, realtime (25 fps, {100 * args.loops} "
        "frames, 960x540, ~13 faces a frame)",
        "options": _options(weights, args.extra),
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--loops", type=int, default=3, help="the sample played N times")
    parser.add_argument("--json", type=Path)
    parser.add_argument("extra", nargs="*", help="more enhance options, after --")
    return parser.parse_args()


def _looped(source: Path, target: Path, loops: int) -> Path:
    """``source``'s video packets ``loops`` times over, each pass's timestamps moved on by the
    clip's length: a long camera-like input with the start-up cost amortised (the 4-s sample
    alone ends before a run settles). Each pass demuxes afresh: muxing takes a packet's data."""
    import av

    with av.open(str(target), "w") as dst:
        video, offset = None, 0
        for _ in range(loops):
            with av.open(str(source)) as src:
                video_in = src.streams.video[0]
                video = video or dst.add_stream_from_template(video_in)
                end = offset
                for packet in src.demux(video_in):
                    if packet.dts is None:  # the demuxer's flush packet
                        continue
                    end = max(end, offset + packet.pts + packet.duration)
                    packet.pts, packet.dts = packet.pts + offset, packet.dts + offset
                    packet.stream = video
                    dst.mux(packet)
                offset = end
    return target


def _copies(clip: Path, folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    return [Path(shutil.copy(clip, folder / f"cam{n}.mp4")) for n in range(1, count + 1)]


def _options(weights: Path, extra: list[str]) -> list[str]:
    return [
        "--model", "identity", "--detector", "retinaface_mobile0.25", "--weights-dir",
        str(weights), "--device", "cpu", "--mask", "box", "--realtime", *extra,
    ]  # fmt: skip


def _enhance(args: list, weights: Path, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "streamgpen", "enhance", *map(str, args)]
    return subprocess.Popen(command + _options(weights, extra), stderr=subprocess.PIPE, text=True)


def _one_process(clips: list[Path], weights: Path, faces: Path, extra: list[str]) -> dict:
    run = _enhance([*clips, "-o", "null", "--faces-json", f"{faces}/"], weights, extra)
    _, err = run.communicate()
    figures = _figures(err, len(clips))
    figures["batches"] = _batches(faces)
    return figures


def _separate_processes(clips: list[Path], weights: Path, extra: list[str]) -> dict:
    runs = [_enhance([clip, "-o", "null"], weights, extra) for clip in clips]
    errs = [run.communicate()[1] for run in runs]
    per_input = [_figures(err, 1)["per_input"][0] for err in errs]
    return {"per_input": per_input, "frames_written": sum(x["frames"] for x in per_input)}


def _figures(stderr: str, count: int) -> dict:
    per_input = []
    for line in stderr.splitlines():
        match = LINE.match(line)
        if match:
            per_input.append(
                {
                    "input": Path(match["name"] or "").name,
                    "frames": int(match["frames"]),
                    "dropped": int(match["dropped"]),
                    "latency_ms_p95": int(match["p95"]) if match["p95"] else None,
                    "fps": _fps(float(match["rate"]), match["unit"]),
                }
            )
    if len(per_input) != count:
        raise SystemExit(f"expected {count} closing lines, got:\n{stderr}")
    return {"per_input": per_input, "frames_written": sum(x["frames"] for x in per_input)}


def _fps(rate: float, unit: str) -> float:
    return rate if unit == "fps" else round(1 / rate, 3)


def _batches(faces: Path) -> dict:
    """Faces per device batch and the batches holding faces of more than one input."""
    inputs_of, faces_of = defaultdict(set), defaultdict(int)
    for log in faces.glob("*.jsonl"):
        for line in log.read_text().splitlines():
            batch = json.loads(line)["batch"]
            inputs_of[batch].add(log.stem)
            faces_of[batch] += 1
    shared = sum(1 for names in inputs_of.values() if len(names) > 1)
    return {
        "count": len(faces_of),
        "faces_per_batch": round(sum(faces_of.values()) / max(len(faces_of), 1), 2),
        "shared_by_inputs": shared,
    }


if __name__ == "__main__":
    main()
