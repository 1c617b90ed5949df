"""A small HTTP server for tests of remote inputs: it serves a folder on 127.0.0.1 and answers range
requests as object stores do (or, with `ranges=False`, ignores them as some plain servers do), and
counts the bytes it sent."""
from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeHandler(SimpleHTTPRequestHandler):
    ranges = True
    fail: int | None = None  # answer every request with this HTTP status
    sent: list[int]

    def log_message(self, *args):  # quiet
        pass

    def send_head(self):
        if self.fail is not None:
            self.sent.append(0)
            self.send_error(self.fail)
            return None
        path = self.translate_path(self.path)
        header = self.headers.get("Range")
        if not self.ranges or not header or not os.path.isfile(path):
            return super().send_head()
        m = re.match(r"bytes=(\d+)-(\d*)$", header.strip())
        if m is None:
            self.send_error(416)
            return None
        size = os.path.getsize(path)
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        if start >= size:
            self.send_error(416)
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._left = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        left = getattr(self, "_left", None)
        if left is None:
            data = source.read()
        else:
            data = source.read(left)
        self.sent.append(len(data))
        try:
            outputfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client had what it wanted
            pass


@contextlib.contextmanager
def serve(folder: Path, ranges: bool = True, fail: int | None = None):
    """(base URL, byte counts sent: one entry per answer) of a server of `folder` while the block
    runs; `fail`: answer everything with that status instead."""
    sent: list[int] = []
    handler = type("Handler", (RangeHandler,), {"ranges": ranges, "fail": fail, "sent": sent})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", sent
    finally:
        server.shutdown()
        server.server_close()
