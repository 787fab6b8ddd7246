"""Throughput of dicomfs.multipart on a WADO-RS-sized answer.

Builds a 200 MB multipart/related body in memory (400 parts of 500 KB random bytes,
with realistic part headers), once with Content-Length part headers (as Orthanc sends)
and once without (as dcm4chee sends), feeds each to the parser in 64 KiB chunks, and
prints the median throughput of 5 runs. The parser must keep up with a fast network
link with room to spare; the target is 500 MB/s.

Run from the checkout's root: PYTHONPATH=. .venv/bin/python -m scripts.benchmarks.multipart
[--runs N] [--parts N] [--part-size N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from dicomfs.multipart import MultipartParser, PartData, PartEnd

BOUNDARY = "DICOMwebBoundary-7d1c4e2a9b3f4a6e8c5d0b1a2f3e4d5c"
CHUNK = 64 * 1024


def build_chunks(
    parts: int, part_size: int, *, content_length: bool, seed: int = 1
) -> tuple[list[bytes], int]:
    """Return the answer pre-split into 64 KiB chunks, and its total size in bytes."""
    rng = random.Random(seed)
    pieces: list[bytes] = [b"\r\n"]  # empty preamble line, as some servers send
    for index in range(parts):
        body = rng.randbytes(part_size)
        headers = [
            b"Content-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
            b"Content-Location: /dicom-web/studies/1.2.3/series/4.5.6/instances/7.8.%d" % index,
        ]
        if content_length:
            headers.append(b"Content-Length: %d" % len(body))
        pieces += [b"--", BOUNDARY.encode(), b"\r\n", b"\r\n".join(headers), b"\r\n\r\n"]
        pieces += [body, b"\r\n"]
    pieces += [b"--", BOUNDARY.encode(), b"--\r\n"]
    message = b"".join(pieces)
    del pieces
    view = memoryview(message)
    chunks = [bytes(view[i : i + CHUNK]) for i in range(0, len(message), CHUNK)]
    return chunks, len(message)


def parse(chunks: list[bytes]) -> tuple[int, int]:
    """Parse the chunks the way the HTTP layer will; return (parts, body bytes)."""
    parser = MultipartParser(BOUNDARY)
    parts = 0
    body = 0
    for chunk in chunks:
        for event in parser.feed(chunk):
            if type(event) is PartData:
                body += len(event.data)
            elif type(event) is PartEnd:
                parts += 1
    parser.close()
    return parts, body


def bench(
    label: str, chunks: list[bytes], size: int, runs: int, parts: int, part_size: int
) -> float:
    """Time ``runs`` parses, check each result, print and return the median MB/s."""
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        got = parse(chunks)
        elapsed = time.perf_counter() - start
        if got != (parts, parts * part_size):
            raise SystemExit(f"{label}: parsed {got}, expected {(parts, parts * part_size)}")
        rates.append(size / elapsed / 1e6)
    median = statistics.median(rates)
    spread = f"min {min(rates):.0f}, max {max(rates):.0f}"
    print(f"{label:<24} {median:8.0f} MB/s  (median of {runs}; {spread})")
    return median


def main(argv: list[str] | None = None) -> int:
    """Build both answers, one at a time to bound memory, and benchmark them."""
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--runs", type=int, default=5)
    args.add_argument("--parts", type=int, default=400)
    args.add_argument("--part-size", type=int, default=500_000)
    opts = args.parse_args(argv)
    for label, content_length in (("with Content-Length", True), ("without Content-Length", False)):
        chunks, size = build_chunks(opts.parts, opts.part_size, content_length=content_length)
        if label.startswith("with "):
            print(f"{size / 1e6:.0f} MB answer, {opts.parts} parts, {len(chunks)} chunks of 64 KiB")
        bench(label, chunks, size, opts.runs, opts.parts, opts.part_size)
        del chunks
    return 0


if __name__ == "__main__":
    sys.exit(main())
