"""``--faces-json``: one JSON line per face (per frame for video), written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from streamgpen.detect import Face
from streamgpen.io.images import atomic_path


class FaceLog:
    """Appends face records to a temporary file and renames it into place on ``close()``.

    An interrupted run still closes the log, so the lines of everything processed are kept.
    """

    def __init__(self, path: Path):
        self._atomic = atomic_path(Path(path))
        self._file = open(self._atomic.__enter__(), "w", encoding="utf-8")  # noqa: SIM115

    def write(
        self,
        face: Face,
        *,
        file: str | None = None,
        frame: int = 0,
        pts: int | None = None,
        track: int | None = None,
        detector_run: bool = True,
    ) -> None:
        """One line: where the face is and how it was found."""
        record: dict = {"file": file} if file is not None else {}
        record["frame"] = frame
        if pts is not None or file is None:
            record["pts"] = pts
        record.update(
            track=track,
            box=[round(float(v), 2) for v in face.box],
            landmarks=[[round(float(x), 2), round(float(y), 2)] for x, y in face.landmarks],
            score=round(float(face.score), 4),
            detector_run=detector_run,
        )
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()
        self._atomic.__exit__(None, None, None)

    def __enter__(self) -> FaceLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
