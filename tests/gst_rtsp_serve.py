"""A looping RTSP test server on GStreamer's gst-rtsp-server, for the test-suite only.

Run it with Debian's system python (``/usr/bin/python3``), which imports Debian's ``gi``;
``tests/rtsp_server.py`` starts it as a subprocess. It needs these Debian packages::

    apt-get install -y --no-install-recommends python3-gi gir1.2-gst-rtsp-server-1.0 \
        gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad

Usage::

    /usr/bin/python3 tests/gst_rtsp_serve.py VIDEO.mp4 --port PORT [--path /live]
        [--record-path /publish --record-dir DIR]

The H.264 video (and AAC audio, if any) of ``VIDEO.mp4`` is read once into memory, without
re-encoding, and served at real-time pace on ``rtsp://127.0.0.1:PORT/live``, looped forever
with continuous timestamps. Each client gets its own session that starts at the clip's first
(key) frame. With ``--record-path``, clients may also publish (ANNOUNCE/RECORD) an H.264
stream to ``rtsp://127.0.0.1:PORT/publish``, or H.264 + AAC to ``.../publish_av``; each
publication is written as MPEG-TS to ``DIR/record-N.ts``. The line ``READY <port>`` on
stdout says the server is listening; any failure is a line ``ERROR ...`` on stderr and a
non-zero exit status (3: packages missing).
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import threading

APT_HINT = (
    "apt-get install -y --no-install-recommends python3-gi gir1.2-gst-rtsp-server-1.0 "
    "gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad"
)

try:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer
except (ImportError, ValueError) as exc:  # ValueError: typelib missing
    print(f"ERROR GStreamer RTSP server unavailable ({exc}); install: {APT_HINT}", file=sys.stderr)
    sys.exit(3)

NEEDED_ELEMENTS = (
    "filesrc",
    "qtdemux",
    "h264parse",
    "aacparse",
    "appsrc",
    "appsink",
    "rtph264pay",
    "rtpmp4gpay",
    "rtph264depay",
    "mpegtsmux",
)


class Clip:
    """The encoded samples of one file, per kind ("video", "audio"), and their loop period."""

    def __init__(self, path: str) -> None:
        self.caps: dict[str, Gst.Caps] = {}
        # (payload, pts, dts, duration, is_delta_unit) per sample, timestamps in ns or NONE
        self.samples: dict[str, list[tuple[GLib.Bytes, int, int, int, bool]]] = {}
        self._load(path)
        if "video" not in self.samples or not self.samples["video"]:
            raise RuntimeError(f"{path}: no H.264 video stream found")
        video = self.samples["video"]
        if any(s[1] == Gst.CLOCK_TIME_NONE for s in video):
            raise RuntimeError(f"{path}: video samples without timestamps")
        last = max(video, key=lambda s: s[1])
        step = last[3] if last[3] != Gst.CLOCK_TIME_NONE else video[1][1] - video[0][1]
        self.period = last[1] + step
        # Audio that runs past the video's end would overlap the next loop's start.
        if "audio" in self.samples:
            self.samples["audio"] = [s for s in self.samples["audio"] if s[1] < self.period]

    def _load(self, path: str) -> None:
        pipeline = Gst.Pipeline.new("loader")
        src = Gst.ElementFactory.make("filesrc")
        src.set_property("location", path)
        demux = Gst.ElementFactory.make("qtdemux")
        pipeline.add(src)
        pipeline.add(demux)
        src.link(demux)
        sinks: dict[str, Gst.Element] = {}
        chains = {
            "video": ("h264parse", "video/x-h264,stream-format=byte-stream,alignment=au"),
            "audio": ("aacparse", "audio/mpeg,mpegversion=4,stream-format=raw"),
        }

        def on_pad(_demux: Gst.Element, pad: Gst.Pad) -> None:
            kind = pad.get_name().split("_")[0]
            if kind not in chains or kind in sinks:
                return
            caps_name = pad.get_current_caps().get_structure(0).get_name()
            if kind == "video" and caps_name != "video/x-h264":
                return
            if kind == "audio" and caps_name != "audio/mpeg":
                return
            parser_name, caps = chains[kind]
            queue = Gst.ElementFactory.make("queue")
            parser = Gst.ElementFactory.make(parser_name)
            if kind == "video":
                parser.set_property("config-interval", -1)  # SPS/PPS before every key frame
            capsf = Gst.ElementFactory.make("capsfilter")
            capsf.set_property("caps", Gst.Caps.from_string(caps))
            sink = Gst.ElementFactory.make("appsink")
            sink.set_property("sync", False)
            sink.set_property("emit-signals", True)
            sink.connect("new-sample", self._on_sample, kind)
            for el in (queue, parser, capsf, sink):
                pipeline.add(el)
                el.sync_state_with_parent()
            pad.link(queue.get_static_pad("sink"))
            queue.link(parser)
            parser.link(capsf)
            capsf.link(sink)
            sinks[kind] = sink

        demux.connect("pad-added", on_pad)
        pipeline.set_state(Gst.State.PLAYING)
        msg = pipeline.get_bus().timed_pop_filtered(
            30 * Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR
        )
        pipeline.set_state(Gst.State.NULL)
        if msg is None:
            raise RuntimeError(f"{path}: timed out reading the file")
        if msg.type == Gst.MessageType.ERROR:
            err, dbg = msg.parse_error()
            raise RuntimeError(f"{path}: {err.message} ({dbg})")

    def _on_sample(self, sink: Gst.Element, kind: str) -> Gst.FlowReturn:
        sample = sink.emit("pull-sample")
        self.caps.setdefault(kind, sample.get_caps())
        buf = sample.get_buffer()
        data = buf.extract_dup(0, buf.get_size())
        delta = bool(buf.get_flags() & Gst.BufferFlags.DELTA_UNIT)
        entry = (GLib.Bytes.new(data), buf.pts, buf.dts, buf.duration, delta)
        self.samples.setdefault(kind, []).append(entry)
        return Gst.FlowReturn.OK


class LoopFeeder:
    """Pushes one kind of a clip's samples into an appsrc, looped, timestamps continuing."""

    def __init__(self, clip: Clip, kind: str, appsrc: Gst.Element) -> None:
        self.appsrc = appsrc
        self.lock = threading.Lock()
        self.done = False
        samples = clip.samples[kind]
        period = clip.period
        none = Gst.CLOCK_TIME_NONE

        def gen():
            for n in itertools.count():
                offset = n * period
                for data, pts, dts, duration, delta in samples:
                    # A new buffer every time (sharing the payload): a pushed buffer may still
                    # sit in a queue downstream, so it must never be modified afterwards.
                    out = Gst.Buffer.new_wrapped_bytes(data)
                    out.pts = pts + offset if pts != none else none
                    out.dts = dts + offset if dts != none else none
                    out.duration = duration
                    if delta:
                        out.set_flags(Gst.BufferFlags.DELTA_UNIT)
                    yield out

        self.buffers = gen()
        appsrc.set_property("caps", clip.caps[kind])
        appsrc.set_property("format", Gst.Format.TIME)
        appsrc.set_property("max-bytes", 1 << 20)
        appsrc.connect("need-data", self._on_need_data)

    def _on_need_data(self, appsrc: Gst.Element, _length: int) -> None:
        with self.lock:
            if self.done:
                return
            for _ in range(8):
                if appsrc.emit("push-buffer", next(self.buffers)) != Gst.FlowReturn.OK:
                    self.done = True  # flushing / shut down
                    return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/live")
    ap.add_argument("--record-path", default=None)
    ap.add_argument("--record-dir", default=None)
    args = ap.parse_args()

    Gst.init(None)
    missing = [e for e in NEEDED_ELEMENTS if Gst.ElementFactory.find(e) is None]
    if missing:
        print(f"ERROR GStreamer elements missing {missing}; install: {APT_HINT}", file=sys.stderr)
        return 3
    try:
        clip = Clip(args.video)
    except RuntimeError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2

    launch = "( appsrc name=vsrc ! queue ! rtph264pay name=pay0 pt=96"
    if "audio" in clip.samples:
        launch += " appsrc name=asrc ! queue ! rtpmp4gpay name=pay1 pt=97"
    launch += " )"

    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    factory.set_shared(False)  # every client starts at the clip's first frame

    def on_configure(_factory, media) -> None:
        # The appsrc's signal connection keeps each feeder alive as long as its media.
        bin_ = media.get_element()
        LoopFeeder(clip, "video", bin_.get_by_name("vsrc"))
        if "audio" in clip.samples:
            LoopFeeder(clip, "audio", bin_.get_by_name("asrc"))

    factory.connect("media-configure", on_configure)

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    mounts.add_factory(args.path, factory)

    if args.record_path:
        if not args.record_dir:
            print("ERROR --record-path needs --record-dir", file=sys.stderr)
            return 2
        counter = itertools.count()

        def on_rec_configure(_factory, media) -> None:
            sink = media.get_element().get_by_name("out")
            sink.set_property("location", f"{args.record_dir}/record-{next(counter)}.ts")

        # alignment=au: a publisher's frames may have several slices (x264 tune=zerolatency).
        video = (
            "rtph264depay name=depay0 ! h264parse config-interval=-1"
            " ! video/x-h264,stream-format=byte-stream,alignment=au ! queue ! mux."
        )
        audio = " rtpmp4gdepay name=depay1 ! aacparse ! queue ! mux."
        out = " mpegtsmux name=mux ! filesink name=out sync=false"
        # The streams a publisher announces must match the mount's: H.264 only, or H.264 + AAC.
        for mount, launch in (
            (args.record_path, f"( {video}{out} )"),
            (args.record_path + "_av", f"( {video}{audio}{out} )"),
        ):
            rec = GstRtspServer.RTSPMediaFactory()
            rec.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
            rec.set_shared(False)
            rec.set_eos_shutdown(True)  # the muxer writes its tail when the publisher leaves
            rec.set_launch(launch)
            rec.connect("media-configure", on_rec_configure)
            mounts.add_factory(mount, rec)

    if server.attach(None) == 0:
        print(f"ERROR cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 2

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, loop.quit)
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
