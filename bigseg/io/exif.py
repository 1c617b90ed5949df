"""What a photograph's header says, read without decoding it: its size (PNG, JPEG) and its EXIF
orientation (JPEG APP1 or PNG eXIf), with the turn that shows its pixels as every viewer does.
Phones store the sensor's rows and a tag saying how to turn them; a mask made from the stored rows
would be transposed against the image people see."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

ORIENTATION_TAG = 0x0112
TURNS = {2: "mirrored", 3: "turned 180 degrees", 4: "flipped upside down", 5: "transposed",
         6: "turned 90 degrees clockwise", 7: "transversed", 8: "turned 90 degrees anticlockwise"}


def orientation(path: str | Path) -> int:
    """The EXIF orientation (1..8; 1 = as stored) of a JPEG or PNG, 1 when it has none."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)  # EXIF lives in the first 64 KiB of a JPEG (APP1's size limit)
    except OSError:
        return 1
    tiff = _jpeg_exif(head) if head[:2] == b"\xff\xd8" else _png_exif(head) if head[:8] == b"\x89PNG\r\n\x1a\n" else None
    return _tiff_orientation(tiff) if tiff else 1


def header_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's frame header; None for other files."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(head) and head[i] == 0xFF:
        marker, size = head[i + 1], struct.unpack(">H", head[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            height, width = struct.unpack(">HH", head[i + 5:i + 9])
            return width, height
        if marker == 0xDA:
            return None
        i += 2 + size
    return None


def apply(image: np.ndarray, value: int) -> np.ndarray:
    """(H, W, ...) pixels as stored -> as displayed for EXIF orientation `value`."""
    turn = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
            8: lambda a: np.rot90(a, 1)}.get(value)
    return image if turn is None else np.ascontiguousarray(turn(image))


def _jpeg_exif(data: bytes) -> bytes | None:
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, size = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            return data[i + 10:i + 2 + size]
        if marker in (0xDA, 0xD9):  # image data starts: no EXIF before it
            return None
        i += 2 + size
    return None


def _png_exif(data: bytes) -> bytes | None:
    i = 8
    while i + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind == b"eXIf":
            return data[i + 8:i + 8 + size]
        if kind == b"IDAT":
            return None
        i += 12 + size
    return None


def _tiff_orientation(tiff: bytes) -> int:
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        offset = struct.unpack(order + "I", tiff[4:8])[0]
        count = struct.unpack(order + "H", tiff[offset:offset + 2])[0]
        for k in range(count):
            entry = tiff[offset + 2 + 12 * k:offset + 14 + 12 * k]
            tag, kind = struct.unpack(order + "HH", entry[:4])
            if tag == ORIENTATION_TAG and kind == 3:
                value = struct.unpack(order + "H", entry[8:10])[0]
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error, IndexError):
        pass  # a damaged EXIF block: the pixels as stored
    return 1
