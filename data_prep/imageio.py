"""Cheap image-bytes triage for the shard writer.

Shards must carry the original JPEG bytes, and a full decode of every image would make shard writing
CPU-bound. So the common case is decided from the bytes alone: JPEG magic, an EOI marker at the end, and a
header walk to the SOF segment (size and component count). Only when that is suspicious (no EOI, unparsable
header, not a JPEG at all) is the image decoded, and only a non-JPEG or a `max_side` resize changes bytes.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass

from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
EOI = b"\xff\xd9"
# SOFn markers that carry frame size (C4 = DHT, C8 = JPG extension, CC = DAC are not frames).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# Bytes some encoders/cameras leave after EOI; tolerated without a decode if they are only padding.
_TAIL = 64


@dataclass
class CheckResult:
    """Outcome of `check_image`: `data` is what goes in the shard (None when skipped)."""

    data: bytes | None
    status: str  # "ok" (original bytes kept), "converted" (bytes re-encoded), "skip"
    kind: str  # jpeg | grayscale | cmyk | png | gif | ... | empty | corrupt
    width: int | None = None
    height: int | None = None
    verified: bool = False  # a full decode was needed (and succeeded)
    resized: bool = False
    error: str = ""
    src_size: tuple[int, int] | None = None  # size before a max_side resize (to scale boxes)


_SEGMENT = struct.Struct(">BBH")  # 0xFF, marker, segment length
_FRAME = struct.Struct(">BHHB")  # precision, height, width, components
_STOP = frozenset({0xDA, 0xD9, 0xD8})  # scan / end / second start before any frame header


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from the first SOF segment, or None if the marker walk fails."""
    n = len(data)
    i = 2
    unpack = _SEGMENT.unpack_from
    while i + 4 <= n:
        ff, marker, seglen = unpack(data, i)
        if ff != 0xFF:
            return None
        if marker in _SOF:
            if i + 10 > n or seglen < 8:
                return None
            _, h, w, comps = _FRAME.unpack_from(data, i + 4)
            return (w, h, comps) if w and h else None
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _STANDALONE:
            i += 2
        elif marker in _STOP:
            return None
        else:
            i += 2 + seglen
    return None


def _has_eoi(data: bytes) -> bool:
    if data.endswith(EOI):
        return True
    tail = data[-_TAIL:]
    j = tail.rfind(EOI)
    return j >= 0 and not tail[j + 2 :].strip(b"\x00\r\n\t ")


def _encode(im: Image.Image, quality: int) -> bytes:
    if im.mode not in ("RGB", "L"):
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            im = bg
        elif im.mode in ("I;16", "I", "F"):
            im = im.convert("L")
        else:
            im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _scaled_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def check_image(
    data: bytes, max_side: int | None = None, quality: int = 95, full_decode: bool = False
) -> CheckResult:
    """Classify image bytes and return what to store.

    ok JPEG / grayscale / CMYK: original bytes; PNG or any other format: re-encoded to JPEG; zero bytes:
    skip 'empty'; undecodable (truncated, garbage): skip 'corrupt'. With `max_side`, larger images are
    downscaled and re-encoded (the only case where a good JPEG's bytes change).
    """
    if not data:
        return CheckResult(None, "skip", "empty", error="zero-byte file")
    if data.startswith(JPEG_MAGIC):
        hdr = jpeg_header(data)
        suspicious = full_decode or hdr is None or not _has_eoi(data)
        im = None
        if suspicious:
            try:
                im = _decode(data)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken streams
                return CheckResult(None, "skip", "corrupt", error=f"{type(e).__name__}: {e}")
            w, h = im.size
            comps = len(im.getbands())
        else:
            w, h, comps = hdr
        kind = {1: "grayscale", 4: "cmyk"}.get(comps, "jpeg")
        if max_side and max(w, h) > max_side:
            if im is None:
                im = Image.open(io.BytesIO(data))
                im.draft(im.mode if im.mode in ("RGB", "L") else "RGB", _scaled_size(w, h, max_side))
                try:
                    im.load()
                except Exception as e:
                    return CheckResult(None, "skip", "corrupt", error=f"{type(e).__name__}: {e}")
            nw, nh = _scaled_size(w, h, max_side)
            out = _encode(im.resize((nw, nh), Image.Resampling.BICUBIC), quality)
            return CheckResult(
                out, "converted", kind, nw, nh, verified=suspicious, resized=True, src_size=(w, h)
            )
        return CheckResult(data, "ok", kind, w, h, verified=suspicious)
    # Not a JPEG: decode whatever PIL understands and re-encode it.
    try:
        im = _decode(data)
    except Exception as e:
        return CheckResult(None, "skip", "corrupt", error=f"not a decodable image ({type(e).__name__}: {e})")
    kind = (im.format or "unknown").lower()
    src = im.size
    if max_side and max(src) > max_side:
        im = im.resize(_scaled_size(*src, max_side), Image.Resampling.BICUBIC)
    out = _encode(im, quality)
    return CheckResult(
        out, "converted", kind, im.size[0], im.size[1], verified=True, resized=im.size != src, src_size=src
    )


_FIRST_READ = 1 << 16


def read_bytes(path: str) -> bytes:
    """Whole file via os.open/os.read: one read covers most images without a stat, which is measurably
    cheaper than open().read() for many small files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, _FIRST_READ)
        if len(data) == _FIRST_READ:
            parts = [data]
            remaining = os.fstat(fd).st_size - _FIRST_READ
            while remaining > 0 and (chunk := os.read(fd, remaining)):
                parts.append(chunk)
                remaining -= len(chunk)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


def check_file(
    path: str, max_side: int | None = None, quality: int = 95, full_decode: bool = False
) -> CheckResult:
    """`check_image` on a file; a missing/unreadable file is a skip ('missing'), not an exception."""
    try:
        data = read_bytes(path)
    except OSError as e:
        return CheckResult(None, "skip", "missing", error=f"{type(e).__name__}: {e}")
    return check_image(data, max_side=max_side, quality=quality, full_decode=full_decode)
