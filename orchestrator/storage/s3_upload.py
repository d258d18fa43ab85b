"""The S3 write stream: parts go up while the writer is still producing the next ones.

s3fs's own file (`S3File`) buffers a whole block (50 MB) before it sends anything, then uploads
each part while the writer waits, one part at a time. Here each part is handed to s3fs's event
loop as soon as it is full and the writer goes on: up to `concurrency` parts are in flight, so
serializing a checkpoint overlaps its upload and a large file goes up over several
connections. A stream smaller than one part is one PUT at close, as before.

Nothing is visible before `close()` (S3 shows a multipart object only once it is completed);
`discard()`, or an exception inside a `with`, aborts the upload. Each request keeps botocore's
per-request retries of the filesystem it runs on (the streams' one, s3.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Any

MIN_PART_BYTES = 5 << 20  # S3's smallest part (except the last one)


def stream_filesystem(kwargs: dict[str, Any], part_bytes: int, concurrency: int) -> Any:
    """An s3fs filesystem whose binary writes ("wb") are PartUploads; everything else as s3fs."""
    import s3fs

    class PartUploadFileSystem(s3fs.S3FileSystem):
        def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
            if mode == "wb":
                return PartUpload(self, path, part_bytes, concurrency)
            return super()._open(path, mode, **kw)

    return PartUploadFileSystem(**kwargs)


class PartUpload:
    """A write-only binary stream to one S3 key (`bucket/key`), through an s3fs filesystem."""

    def __init__(self, fs: Any, path: str, part_bytes: int, concurrency: int) -> None:
        self._fs = fs
        self._bucket, _, self._key = path.removeprefix("s3://").partition("/")
        self._part_bytes, self._concurrency = part_bytes, concurrency
        self._buf = bytearray()
        self._pos = 0
        self._upload_id: str | None = None
        self._parts: list[concurrent.futures.Future[Any]] = []
        self.closed = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass  # a part goes up when it is full; the rest at close

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = view.nbytes
        while view.nbytes:
            if not self._buf and view.nbytes >= self._part_bytes:  # one copy, not two
                self._send(view[: self._part_bytes].tobytes())
                view = view[self._part_bytes :]
                continue
            take = min(view.nbytes, self._part_bytes - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == self._part_bytes:
                self._send(bytes(self._buf))
                self._buf = bytearray()
        self._pos += n
        return n

    def _call(self, method: str, **kwargs: Any) -> concurrent.futures.Future[Any]:
        coro = self._fs._call_s3(method, Bucket=self._bucket, Key=self._key, **kwargs)
        return asyncio.run_coroutine_threadsafe(coro, self._fs.loop)

    def _send(self, part: bytes) -> None:
        """Start uploading the next part; wait first while `concurrency` parts are in flight
        (what bounds the memory: parts in flight plus the one being filled)."""
        if self._upload_id is None:
            created = self._call("create_multipart_upload").result()
            self._upload_id = created["UploadId"]
        while len(pending := [f for f in self._parts if not f.done()]) >= self._concurrency:
            concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for done in self._parts:
            if done.done() and done.exception() is not None:
                raise done.exception()  # type: ignore[misc]  # fail now, not at close
        number = len(self._parts) + 1
        self._parts.append(
            self._call("upload_part", UploadId=self._upload_id, PartNumber=number, Body=part)
        )

    def close(self) -> None:
        """Make the object visible: one PUT, or the upload's completion once every part is up."""
        if self.closed:
            return
        try:
            if self._upload_id is None:
                self._call("put_object", Body=bytes(self._buf)).result()
            else:
                if self._buf:
                    self._send(bytes(self._buf))
                parts = [_part(i, f.result()) for i, f in enumerate(self._parts, 1)]
                done = self._call("complete_multipart_upload", UploadId=self._upload_id,
                                  MultipartUpload={"Parts": parts})  # fmt: skip
                done.result()
        except BaseException:
            self.discard()
            raise
        self.closed = True
        self._buf = bytearray()

    def discard(self) -> None:
        """Drop what was written: cancel the parts in flight and abort the upload. An abort
        that fails leaves the parts to `Store.abort_multipart_uploads` (the first save's
        garbage collection)."""
        if self.closed:
            return
        self.closed = True
        self._buf = bytearray()
        for f in self._parts:
            f.cancel()
        concurrent.futures.wait(self._parts)
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", UploadId=self._upload_id).result()

    def __enter__(self) -> PartUpload:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def _part(number: int, answer: dict[str, Any]) -> dict[str, Any]:
    """What CompleteMultipartUpload needs of an UploadPart answer: its number, ETag and any
    checksum the server computed (required where the upload was created with one)."""
    sums = {k: v for k, v in answer.items() if k.startswith("Checksum") and k != "ChecksumType"}
    return {"PartNumber": number, "ETag": answer["ETag"], **sums}
