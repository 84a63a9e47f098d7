"""Uploads streamed to disk: a multipart body parsed as it arrives, its file part written straight
into the spool, its size capped while it comes in.

Starlette's own form parser spools file parts to the system's temporary folder; a video job's
upload would then be copied (gigabytes) into the spool. Here python-multipart's streaming parser
writes the one file part where it will stay, and small text fields (``format``, ``blend`` ...) are
kept in memory up to a few KiB each. Nothing of the request names a path: the file is written
under the name the caller chose, and the client's file name is only reported.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from streamgpen.errors import UserError
from streamgpen.files import atomic_path
from streamgpen.web.responses import HttpError, body_chunks

# A text field (format=, blend=, faces=) is a word or a number, never more.
MAX_FIELD_BYTES = 4096
MAX_FIELDS = 16
# A part's header line (Content-Disposition with a file name, Content-Type): a few hundred bytes.
MAX_HEADER_BYTES = 8192


@dataclass(kw_only=True)
class Upload:
    """What a multipart upload held: the file part written to ``path``, its declared name and
    type, its size, and the small text fields beside it."""

    path: Path
    filename: str = ""
    content_type: str = ""
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)


async def receive_upload(
    request: Request, target: Path, *, max_bytes: int, part: str = "file"
) -> Upload:
    """Stream the multipart body's ``part`` into ``target`` (written under a temporary name,
    renamed when complete: ``files.atomic_path``) and return it with the other fields.

    Raises :class:`HttpError`: 415 for a body that is not multipart/form-data, 413 past
    ``max_bytes`` (the declared length is refused before reading; a chunked body is cut where it
    crosses the limit), 408 when the body stalls, 400 for a malformed body or a missing ``part``,
    507 when the spool cannot take it (a full disk).
    """
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise HttpError(415, f"send multipart/form-data with a {part!r} part")
    try:
        with atomic_path(target) as partial, open(partial, "wb") as sink:
            collector = _Collector(part, sink)
            parser = MultipartParser(params[b"boundary"], collector.callbacks())
            await _parse(request, parser, max_bytes)
            if not collector.found:
                raise HttpError(400, f"the form has no {part!r} file part")
    except UserError as error:  # atomic_path's OSError: a full disk, the spool unwritable
        raise HttpError(507, f"the spool cannot take the upload: {error}") from None
    return Upload(
        path=target,
        filename=collector.filename,
        content_type=collector.content_type,
        size=collector.size,
        fields=collector.fields,
    )


async def _parse(request: Request, parser: MultipartParser, max_bytes: int) -> None:
    try:
        async for chunk in body_chunks(request, max_bytes=max_bytes):
            parser.write(chunk)
        parser.finalize()
    except HttpError:
        raise
    except Exception as error:  # python-multipart's parse errors, and the collector's
        raise HttpError(400, f"bad multipart body: {error}") from None


class _Collector:
    """python-multipart callbacks: the wanted file part to ``sink``, text fields to memory."""

    def __init__(self, part: str, sink: BinaryIO):
        self.part, self.sink = part, sink
        self.found = False
        self.filename = self.content_type = ""
        self.size = 0
        self.fields: dict[str, str] = {}
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._text = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._add("_header_name", data[start:end]),
            "on_header_value": lambda data, start, end: self._add("_header_value", data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _add(self, name: str, data: bytes) -> None:
        value = getattr(self, name) + data
        if len(value) > MAX_HEADER_BYTES:
            raise ValueError(f"a part's header is over {MAX_HEADER_BYTES} bytes")
        setattr(self, name, value)

    def _begin(self) -> None:
        self._headers, self._name, self._is_file, self._text = {}, None, False, bytearray()

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        self._is_file = self._name == self.part
        if self._is_file:
            if self.found:
                raise ValueError(f"more than one {self.part!r} part")
            self.found = True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
            self.content_type = self._headers.get(b"content-type", b"").decode("latin-1")
        elif len(self.fields) >= MAX_FIELDS:
            raise ValueError(f"more than {MAX_FIELDS} fields")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.sink.write(data[start:end])
            self.size += end - start
            return
        self._text += data[start:end]
        if len(self._text) > MAX_FIELD_BYTES:
            raise ValueError(f"field {self._name!r} is over {MAX_FIELD_BYTES} bytes")

    def _end(self) -> None:
        if not self._is_file and self._name:
            with contextlib.suppress(UnicodeDecodeError):
                self.fields[self._name] = self._text.decode()
