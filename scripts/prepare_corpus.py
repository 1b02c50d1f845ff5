#!/usr/bin/env python
"""Build the offline Jane Austen corpus in ``data/austen/`` from Debian's ``r-cran-janeaustenr``.

The six novels (public-domain texts, from Project Gutenberg via the CRAN package ``janeaustenr``, MIT
licensed) ship in that package as an R lazy-load database ``data/Rdata.{rdb,rdx}``.  This script reads it
with the pure-Python ``rdata`` package -- no R needed -- and writes one deterministic gzip per novel::

    data/austen/<book>.txt.gz     the book's lines joined with "\\n" (plus a final "\\n"), UTF-8, gzip -9, mtime 0
    data/austen/MANIFEST.tsv      book, split, bytes, lines and sha256 of each uncompressed text

Where the package comes from (the first that applies):

* ``--deb PATH``      a downloaded ``r-cran-janeaustenr_*.deb`` (any machine, no apt needed);
* ``--pkg-dir DIR``   an installed R package directory, e.g. ``/usr/lib/R/site-library/janeaustenr``
                      (from ``apt-get install r-cran-janeaustenr`` or R's ``install.packages("janeaustenr")``);
* otherwise the installed Debian package if present, else ``apt-get download r-cran-janeaustenr``
  into a temporary folder.  That needs a Debian/Ubuntu system with apt and its package lists (run
  ``apt-get update`` first on a fresh container); ``apt-get download`` does NOT need root.

Usage::

    python scripts/prepare_corpus.py                 # -> <repo>/data/austen
    python scripts/prepare_corpus.py --cache         # -> $H1BKV_CACHE or $XDG_CACHE_HOME/h1bkv or ~/.cache/h1bkv, + /data/austen
    python scripts/prepare_corpus.py --out DIR --deb r-cran-janeaustenr_1.0.0-1_all.deb

The split used by ``h1bkv_lite.data.load_corpus`` is fixed: ``validation`` = persuasion, ``train`` = the
other five novels (see data/README.md).  Requires: ``pip install rdata`` (a dev/notebooks extra).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
VALIDATION_BOOKS = ("persuasion",)
DEB_PACKAGE = "r-cran-janeaustenr"
INSTALLED_PKG_DIR = Path("/usr/lib/R/site-library/janeaustenr")
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_cache_dir() -> Path:
    """Same rule as ``h1bkv_lite.data.cache_dir`` (duplicated so this script needs neither torch nor the package)."""
    if os.environ.get("H1BKV_CACHE"):
        return Path(os.environ["H1BKV_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "h1bkv"


# --------------------------------------------------------------------------------------------- .deb handling
def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (a .deb is one)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (.deb)")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        pos += 60
        out[name] = data[pos : pos + size]
        pos += size + (size & 1)
    return out


def extract_deb(deb: Path, dest: Path) -> Path:
    """Extract the janeaustenr data folder of a .deb into ``dest``; return the R package directory."""
    members = _ar_members(deb.read_bytes())
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise ValueError(f"{deb}: no data.tar.* member")
    payload = members[name]
    if name.endswith(".xz"):
        payload = lzma.decompress(payload)
    elif name.endswith(".gz"):
        payload = gzip.decompress(payload)
    elif name.endswith(".bz2"):
        payload = bz2.decompress(payload)
    elif name.endswith(".zst"):  # not decodable by the standard library before 3.14: let dpkg do it
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        return _find_pkg_dir(dest)
    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
        wanted = [m for m in tar.getmembers() if "/janeaustenr/" in m.name and m.isfile()]
        for m in wanted:
            target = dest / m.name.lstrip("./")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(m).read())
    return _find_pkg_dir(dest)


def _find_pkg_dir(root: Path) -> Path:
    hits = sorted(p.parent.parent for p in root.rglob("janeaustenr/data/Rdata.rdx"))
    if not hits:
        raise FileNotFoundError(f"no janeaustenr/data/Rdata.rdx under {root}")
    return hits[0]


def apt_download(dest: Path) -> Path:
    """``apt-get download r-cran-janeaustenr`` into ``dest`` (no root needed); return the .deb path."""
    if shutil.which("apt-get") is None:
        raise SystemExit(
            "apt-get not found: this needs a Debian/Ubuntu system. Download r-cran-janeaustenr_*.deb "
            "(https://packages.debian.org/r-cran-janeaustenr) and pass --deb PATH."
        )
    print(f"running: apt-get download {DEB_PACKAGE}  (in {dest}; no root needed)", file=sys.stderr)
    proc = subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=dest, capture_output=True, text=True)
    debs = sorted(dest.glob(f"{DEB_PACKAGE}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise SystemExit(
            f"apt-get download {DEB_PACKAGE} failed (rc={proc.returncode}):\n{proc.stderr.strip()}\n"
            "If the package is unknown, run `apt-get update` first (that one needs root), "
            "or pass --deb PATH / --pkg-dir DIR."
        )
    return debs[-1]


# --------------------------------------------------------------------------------------------- R lazy-load DB
def _decompress_index(raw: bytes) -> bytes:
    """The .rdx index: gzip (R >= 3.x writes it with saveRDS) or 4-byte length + zlib."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    return zlib.decompress(raw[4:])


def _decompress_chunk(chunk: bytes, compressed) -> bytes:
    """One .rdb chunk: 4-byte big-endian uncompressed length, then the payload (R's lazyLoadDBinsertValue)."""
    (length,) = struct.unpack(">I", chunk[:4])
    if compressed in (2, 3):  # bzip2 / xz carry a one-byte type tag; '0' = stored
        kind, body = chunk[4:5], chunk[5:]
        data = {b"2": bz2.decompress, b"Z": lzma.decompress, b"0": bytes}[kind](body)
    else:  # TRUE / 1: zlib
        data = zlib.decompress(chunk[4:])
    if len(data) != length:
        raise ValueError(f"chunk length mismatch: {len(data)} != {length}")
    return data


def read_books(pkg_dir: Path) -> dict[str, list[str]]:
    """Read the six books (character vectors of lines) from ``<pkg_dir>/data/Rdata.{rdx,rdb}``."""
    try:
        import rdata
    except ImportError as err:
        raise SystemExit("this script needs the `rdata` package: pip install rdata") from err

    data_dir = pkg_dir / "data"

    def parse(raw: bytes):
        with warnings.catch_warnings():  # "Unknown file type: assumed RDS" -- correct for serialized objects
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(_decompress_index((data_dir / "Rdata.rdx").read_bytes()))
    variables = {str(k): v for k, v in index["variables"].items()}
    compressed = index.get("compressed", [True])
    compressed = int(compressed[0]) if hasattr(compressed, "__len__") else int(compressed)
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    books = {}
    for book in BOOKS:
        if book not in variables:
            raise ValueError(f"{data_dir}: no object {book!r} (found {sorted(variables)})")
        offset, size = (int(x) for x in variables[book])
        lines = parse(_decompress_chunk(rdb[offset : offset + size], compressed))
        books[book] = [str(x) for x in lines]
    return books


# --------------------------------------------------------------------------------------------- output
def book_text(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def write_gzip(path: Path, text: str) -> None:
    """Deterministic gzip: no file name, mtime 0, level 9."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def write_corpus(books: dict[str, list[str]], out: Path) -> list[tuple]:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for book in BOOKS:
        text = book_text(books[book])
        raw = text.encode("utf-8")
        path = out / f"{book}.txt.gz"
        write_gzip(path, text)
        split = "validation" if book in VALIDATION_BOOKS else "train"
        rows.append((book, split, len(raw), len(books[book]), path.stat().st_size, hashlib.sha256(raw).hexdigest()))
    with open(out / "MANIFEST.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("book\tsplit\tbytes\tlines\tgzip_bytes\tsha256\n")
        for row in rows:
            f.write("\t".join(str(x) for x in row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--deb", type=Path, help="path to r-cran-janeaustenr_*.deb (else apt-get download it)")
    src.add_argument("--pkg-dir", type=Path, help="an installed janeaustenr R package directory")
    dst = ap.add_mutually_exclusive_group()
    dst.add_argument("--out", type=Path, help="output folder (default: <repo>/data/austen)")
    dst.add_argument("--cache", action="store_true", help="write to the user cache: <cache>/data/austen")
    args = ap.parse_args(argv)

    out = args.out or (default_cache_dir() / "data" / "austen" if args.cache else REPO_ROOT / "data" / "austen")
    with tempfile.TemporaryDirectory(prefix="h1bkv-austen-") as tmp:
        tmp = Path(tmp)
        if args.pkg_dir:
            pkg_dir = args.pkg_dir
        elif args.deb:
            pkg_dir = extract_deb(args.deb, tmp)
        elif (INSTALLED_PKG_DIR / "data" / "Rdata.rdx").is_file():
            pkg_dir = INSTALLED_PKG_DIR
        else:
            pkg_dir = extract_deb(apt_download(tmp), tmp)
        print(f"reading {pkg_dir / 'data' / 'Rdata.rdb'}", file=sys.stderr)
        books = read_books(pkg_dir)
    rows = write_corpus(books, out)
    print(f"wrote {out}:")
    for book, split, nbytes, nlines, gz, _ in rows:
        print(f"  {book:18s} {split:10s} {nbytes:9d} bytes {nlines:6d} lines  ({gz} gzipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
