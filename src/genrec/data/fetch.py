"""Fetchers of public datasets into a local cache: ML-100K as RecBole atomic files.

``fetch_ml100k`` tries GroupLens first and, where it cannot be reached, takes the two files
that ship inside the ``recbole==1.2.1`` wheel on the Python package index (the wheel is
downloaded with pip, opened as a zip and never installed). Both routes give
``ml-100k.inter`` (``user_id item_id rating timestamp``, byte-identical either way: the
wheel's file is the RecBole header followed by GroupLens's u.data) and ``ml-100k.item``
(``item_id movie_title release_year class``). Every download is checked against a SHA-256
recorded here, and the result is written atomically with a ``fetch.json`` that lets the
next call reuse the cache without any network.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from genrec.io import atomic_write_bytes, read_json, sha256_file, write_json

log = logging.getLogger("genrec")

ML100K_FILES = ("ml-100k.inter", "ml-100k.item")

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# SHA-256 of GroupLens's ml-100k.zip (4,924,029 bytes; the archive whose published MD5 is
# 0e33842e24a9c977be4e0107933c0723).
GROUPLENS_ZIP_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
GROUPLENS_TIMEOUT_S = 10

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
# Computed once from recbole-1.2.1-py3-none-any.whl. The .inter hash is also what the
# GroupLens conversion produces (the RecBole header + u.data, unchanged).
RECBOLE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
PIP_TIMEOUT_S = 600

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
# u.genre, in the order of u.item's 19 genre flags.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


class ChecksumError(RuntimeError):
    """A downloaded file is not the one whose SHA-256 is recorded in genrec.data.fetch."""


def default_cache_dir() -> Path:
    """``$GENREC_CACHE/ml-100k``, else ``~/.cache/genrec/ml-100k``."""
    root = os.environ.get("GENREC_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "genrec") / "ml-100k"


def check_sha256(data: bytes, expected: str, what: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChecksumError(
            f"{what}: SHA-256 {actual} does not match the recorded {expected}; the download is corrupt or not "
            "the published file. Retry; if it persists, the upstream file changed: check it and update "
            "the constant in genrec/data/fetch.py"
        )


def grouplens_to_atomic(zip_bytes: bytes) -> dict[str, bytes]:
    """ml-100k.zip (u.data, u.item) -> the RecBole atomic files ml-100k.inter and ml-100k.item."""
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        members = {Path(n).name: n for n in zf.namelist()}
        missing = [m for m in ("u.data", "u.item") if m not in members]
        if missing:
            raise ValueError(f"ml-100k.zip lacks {', '.join(missing)} (it holds {', '.join(sorted(members))})")
        u_data = zf.read(members["u.data"]).decode("ascii")
        u_item = zf.read(members["u.item"]).decode("latin-1")

    inter = [INTER_HEADER]
    for line_no, line in enumerate(u_data.splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 4 or not all(f.isdigit() for f in fields):
            raise ValueError(f"ml-100k.zip u.data: line {line_no}: expected 'user<TAB>item<TAB>rating<TAB>time'")
        inter.append("\t".join(fields) + "\n")

    out = io.StringIO()
    # csv quoting keeps a title with a tab or a quote in one field, as the recbole reader expects.
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    out.write(ITEM_HEADER)
    for line_no, line in enumerate(u_item.splitlines(), 1):
        fields = line.split("|")
        if len(fields) != 5 + len(ML100K_GENRES) or not fields[0].isdigit():
            raise ValueError(
                f"ml-100k.zip u.item: line {line_no}: expected 24 '|'-separated fields "
                "(id|title|release date|video release date|IMDb URL|19 genre flags)"
            )
        item_id, title, release_date = fields[0], fields[1].strip(), fields[2].strip()
        # "Toy Story (1995)" -> title "Toy Story", year "1995"; else the year of "01-Jan-1995".
        match = re.fullmatch(r"(.*\S)\s+\((\d{4})\)", title)
        if match:
            title, year = match.group(1), match.group(2)
        else:
            year = release_date[-4:] if re.fullmatch(r".*\d{4}", release_date) else ""
        genres = [g for g, flag in zip(ML100K_GENRES, fields[5:]) if flag.strip() == "1"]
        writer.writerow([item_id, title, year, " ".join(genres)])
    return {"ml-100k.inter": "".join(inter).encode("utf-8"), "ml-100k.item": out.getvalue().encode("utf-8")}


def download_grouplens() -> bytes:
    """GroupLens's ml-100k.zip; raises OSError (URLError, timeout) when it cannot be reached."""
    with urllib.request.urlopen(GROUPLENS_URL, timeout=GROUPLENS_TIMEOUT_S) as response:
        return response.read()


def from_grouplens() -> dict[str, bytes]:
    data = download_grouplens()
    check_sha256(data, GROUPLENS_ZIP_SHA256, GROUPLENS_URL)
    files = grouplens_to_atomic(data)
    check_sha256(files["ml-100k.inter"], RECBOLE_SHA256["ml-100k.inter"], "ml-100k.inter converted from u.data")
    return files


def download_recbole_wheel(directory: Path) -> Path:
    """``pip download`` the recbole wheel (no dependencies, no install) into ``directory``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", RECBOLE_REQUIREMENT,
           "-d", str(directory)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"`{' '.join(cmd)}` did not finish in {PIP_TIMEOUT_S} s") from exc
    wheels = sorted(directory.glob("recbole-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise OSError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    return wheels[0]


def from_recbole_wheel() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="genrec-recbole-") as tmp:
        wheel = download_recbole_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            files = {}
            for name in ML100K_FILES:
                try:
                    files[name] = zf.read(RECBOLE_MEMBER_DIR + name)
                except KeyError:
                    raise ChecksumError(f"{wheel.name} has no {RECBOLE_MEMBER_DIR + name}") from None
    for name, data in files.items():
        check_sha256(data, RECBOLE_SHA256[name], f"{name} from the {RECBOLE_REQUIREMENT} wheel")
    return files


# Tried in order; a source that cannot be reached (OSError) hands over to the next one.
SOURCES: tuple[tuple[str, Callable[[], dict[str, bytes]]], ...] = (
    (GROUPLENS_URL, from_grouplens),
    (f"{RECBOLE_REQUIREMENT} wheel ({RECBOLE_MEMBER_DIR})", from_recbole_wheel),
)


def cached(cache_dir: Path) -> bool:
    """True when fetch.json exists and every file it lists is present with its recorded SHA-256."""
    record = cache_dir / "fetch.json"
    if not record.is_file():
        return False
    try:
        hashes = read_json(record)["sha256"]
    except (ValueError, KeyError, TypeError):
        return False
    return (
        isinstance(hashes, dict)
        and set(hashes) == set(ML100K_FILES)
        and all((cache_dir / name).is_file() and sha256_file(cache_dir / name) == h for name, h in hashes.items())
    )


def fetch_ml100k(cache_dir: Path | None = None) -> Path:
    """A directory holding ml-100k.inter and ml-100k.item, fetched once and then reused."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cached(cache_dir):
        return cache_dir
    failures = []
    for label, source in SOURCES:
        try:
            files = source()
        except (OSError, http.client.HTTPException) as exc:
            log.warning("ml-100k: %s unreachable (%s); trying the next source", label, exc)
            failures.append(f"  {label}: {exc}")
            continue
        for name, data in files.items():
            atomic_write_bytes(cache_dir / name, data)
        # Written last: its presence means both files are complete.
        write_json(
            cache_dir / "fetch.json",
            {"source": label, "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}},
        )
        log.info("ml-100k: fetched from %s into %s", label, cache_dir)
        return cache_dir
    raise OSError(
        "could not fetch ml-100k from any source:\n" + "\n".join(failures) + "\nPut RecBole's ml-100k.inter and "
        "ml-100k.item in a directory and read it with data.format=recbole data.path=DIR data.name=ml-100k"
    )


FETCHERS: dict[str, Callable[[], Path]] = {"ml-100k": fetch_ml100k}


def fetch(name: str) -> Path:
    """Fetch the public dataset ``name`` into the default cache; returns its directory."""
    fetcher = FETCHERS.get(name)
    if fetcher is None:
        raise ValueError(f"no fetcher for {name!r}: use one of {', '.join(FETCHERS)}")
    return fetcher()
