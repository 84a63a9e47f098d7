"""``--faces-json``: one JSON line per face (per frame for video), written atomically."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from streamgpen.faces.types import Face
from streamgpen.files import atomic_path


class FaceLog:
    """Appends face records to a temporary file and renames it into place on ``close()``.

    An interrupted run still closes the log (``close()`` from a ``finally``, or the ``with``
    block's end, exception or not), so the lines of everything processed are kept.
    """

    def __init__(self, path: Path):
        with contextlib.ExitStack() as stack:
            # Entered in order, left in reverse: the file is closed, then renamed into place.
            # Should opening fail, the with-block removes the temporary file again.
            temp = stack.enter_context(atomic_path(Path(path)))
            self._file = stack.enter_context(open(temp, "w", encoding="utf-8"))
            self._open = stack.pop_all()

    def write(
        self,
        face: Face,
        *,
        file: str | None = None,
        frame: int = 0,
        pts: int | None = None,
        track: int | None = None,
        detector_run: bool = True,
        batch: int | None = None,
    ) -> None:
        """One line: where the face is and how it was found (``batch``: the device batch it was
        restored in, numbered over the process)."""
        record: dict = {"file": file} if file is not None else {}
        record["frame"] = frame
        if pts is not None or file is None:
            record["pts"] = pts
        record.update(track=track, **face_record(face), detector_run=detector_run)
        if batch is not None:
            record["batch"] = batch
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Close the file and rename it into place (once; later calls do nothing)."""
        self._open.close()

    def __enter__(self) -> FaceLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def face_record(face: Face) -> dict:
    """A face as JSON data: box, landmarks (pixels, 2 decimals) and score (also the service's)."""
    return {
        "box": [round(float(v), 2) for v in face.box],
        "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in face.landmarks],
        "score": round(float(face.score), 4),
    }
