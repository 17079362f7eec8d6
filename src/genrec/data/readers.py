"""Readers of raw recommendation data, one per upstream format, chosen by ``data.format``.

``open_source(cfg)`` looks the format up in :data:`READERS` and returns a :class:`RawSource`
whose two streams are generators over the raw files: a file is read line by line (gzip or
plain, told apart by its first bytes), never whole, so a tens-of-GB review dump costs the
memory of one line. The exceptions are the LC-Rec JSON documents and the P5 ``datamaps.json``,
which are single JSON documents of a few MB and are parsed whole.

Every reader emits ``Interaction(user, item, timestamp, rating)`` with string ids and item
dicts with the key ``item`` (the same raw id) and the text fields of ``ITEM_FIELDS`` as
clean strings: HTML entities unescaped, runs of whitespace (newlines included) collapsed to
one space, lists of categories joined with ``", "``, lists of description paragraphs joined
with ``" "``, ``""`` where the source has nothing. The formats and their files are listed in
docs/data.md.

A malformed line goes to ``report.bad(path, line_no, why)``: ``data.on_bad_line=error``
stops there with the file and line, ``skip`` counts it in the dataset statistics.
"""

from __future__ import annotations

import ast
import csv
import gzip
import html
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from genrec.config import DataConfig
from genrec.data.raw import BadInput, BadLineReport, Interaction, RawSource

GZIP_MAGIC = b"\x1f\x8b"
# Interactions per Parquet batch: bounds the memory of a Parquet read like a line does for text.
PARQUET_BATCH_ROWS = 65_536


# --------------------------------------------------------------------------- files


def open_binary(path: Path) -> BinaryIO:
    """``path`` opened for reading bytes, decompressed when it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes) of the non-blank lines of a text file, streamed."""
    with open_binary(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.isspace():
                yield line_no, line


def iter_text_lines(path: Path, report: BadLineReport) -> Iterator[str]:
    """Every line of ``path`` decoded as UTF-8, newline kept (what ``csv.reader`` wants).

    A line that is not UTF-8 is reported and replaced by an empty line, so the csv module's
    line count stays that of the file.
    """
    with open_binary(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as exc:
                report.bad(str(path), line_no, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
                yield "\n"


def read_json_document(path: Path) -> tuple[Any, str]:
    """A whole (small) JSON document and its text; a syntax error names the file and line."""
    with open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        return json.loads(text), text
    except json.JSONDecodeError as exc:
        # One broken document cannot be skipped line by line, so this stops under any on_bad_line.
        raise BadInput(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc


def key_line(text: str, key: str) -> int:
    """Line number of ``"key":`` in a JSON document's text (0 when not found), for error messages."""
    match = re.search(re.escape(json.dumps(key)) + r"\s*:", text)
    return text.count("\n", 0, match.start()) + 1 if match else 0


def find_file(directory: Path, names: list[str], what: str, gz: bool = True) -> Path:
    """The first of ``names`` (or ``name.gz``) present in ``directory``; else name them all."""
    candidates = [n for name in names for n in ([name, name + ".gz"] if gz else [name])]
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{what}: expected one of {', '.join(candidates)} in {directory}")


def data_dir(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise FileNotFoundError(f"data.path is empty: set it to the directory holding the {cfg.format} files")
    directory = Path(cfg.path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"data.path={cfg.path!r} is not a directory (resolved to {directory.resolve()})")
    return directory


def need_name(cfg: DataConfig, example: str) -> str:
    if not cfg.name:
        raise ValueError(f"data.name is empty: set it to the dataset name, e.g. {example}")
    return cfg.name


def no_ratings(cfg: DataConfig, where: str) -> None:
    """A positive min_rating on data without ratings would filter nothing: say so instead."""
    if cfg.min_rating > 0:
        raise ValueError(f"data.min_rating={cfg.min_rating} but {where} has no ratings: set data.min_rating=0")


# --------------------------------------------------------------------------- values


def clean_text(value: Any) -> str:
    """One line of plain text: lists joined with spaces, HTML entities unescaped, whitespace collapsed."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(t for t in (clean_text(v) for v in value) if t)
    text = str(value)
    # Amazon metadata holds doubly escaped entities too ("Kirk&amp;#39;s"): unescape until stable.
    for _ in range(3):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    return " ".join(text.split())


def clean_categories(value: Any) -> str:
    """Categories as one ``", "``-joined path; of a list of paths (Amazon 2014) the first."""
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], (list, tuple)):
            value = value[0]
        return ", ".join(t for t in (clean_text(v) for v in value) if t)
    return clean_text(value)


def make_item(raw_id: str, title: Any, brand: Any, categories: Any, description: Any, **extra: Any) -> dict:
    """An item dict as ``prepare`` wants it; extra fields that are None are left out."""
    item = {
        "item": raw_id,
        "title": clean_text(title),
        "brand": clean_text(brand),
        "categories": clean_categories(categories),
        "description": clean_text(description),
    }
    item.update((k, v) for k, v in extra.items() if v is not None and v != "")
    return item


def parse_number(value: Any, what: str) -> float:
    if value is None:
        raise ValueError(f"{what} is missing")
    if isinstance(value, bool) or value == "":
        raise ValueError(f"{what} is {value!r}, not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} is {value!r}, not a finite number")
    return number


def parse_time(value: Any, what: str) -> float:
    """Seconds since the epoch from a number, an ISO 8601 string, or a datetime (naive = UTC)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            try:
                value = datetime.fromisoformat(value.strip())
            except ValueError:
                raise ValueError(f"{what} is {value!r}: neither a number nor an ISO 8601 date") from None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    return parse_number(value, what)


def parse_id(value: Any, what: str) -> str:
    if value is None or isinstance(value, (bool, list, dict)) or str(value).strip() == "":
        raise ValueError(f"{what} is missing or empty")
    return str(value).strip()


def first_image(*candidates: Any) -> str | None:
    """The first image URL among strings, lists of URLs and 2023-style dicts (large, else hi_res)."""
    for c in candidates:
        for v in c if isinstance(c, list) else [c]:
            if isinstance(v, dict):
                v = v.get("large") or v.get("hi_res") or v.get("thumb")
            if isinstance(v, str) and v.strip():
                return v.strip()
    return None


def parse_json_object(line: bytes) -> dict:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


def parse_literal_object(line: bytes) -> dict:
    """A 2014 meta line: a Python dict literal (single quotes), read with ``ast.literal_eval``, never eval.

    Lines that happen to be strict JSON take the faster json path.
    """
    try:
        return parse_json_object(line)
    except ValueError:
        pass
    try:
        record = ast.literal_eval(line.decode("utf-8"))
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise ValueError(f"not a Python literal ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a dict literal, got {type(record).__name__}")
    return record


# --------------------------------------------------------------------------- line-based JSON


def json_interactions(
    path: Path,
    report: BadLineReport,
    keys: tuple[str, str, str, str],
    min_rating: float,
    time_scale: float = 1.0,
) -> Iterator[Interaction]:
    """Interactions of a JSON-lines review file; ``keys`` = (user, item, rating, timestamp) fields."""
    user_key, item_key, rating_key, time_key = keys
    for line_no, line in iter_lines(path):
        try:
            record = parse_json_object(line)
            user = parse_id(record.get(user_key), user_key)
            item = parse_id(record.get(item_key), item_key)
            rating = parse_number(record.get(rating_key), rating_key)
            timestamp = parse_number(record.get(time_key), time_key) / time_scale
        except ValueError as exc:
            report.bad(str(path), line_no, str(exc))
            continue
        if rating >= min_rating:
            yield Interaction(user, item, timestamp, rating)


def json_items(
    path: Path, report: BadLineReport, parse: Callable[[bytes], dict], to_item: Callable[[dict], dict]
) -> Iterator[dict]:
    """Item dicts of a line-based metadata file; ``to_item`` raises KeyError/ValueError on a bad record."""
    for line_no, line in iter_lines(path):
        try:
            yield to_item(parse(line))
        except (KeyError, ValueError, TypeError) as exc:
            why = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            report.bad(str(path), line_no, why)


def amazon2014_item(r: dict) -> dict:
    rank = r.get("salesRank")
    sales_type, sales_rank = next(iter(rank.items())) if isinstance(rank, dict) and rank else (None, None)
    return make_item(
        parse_id(r.get("asin"), "asin"),
        r.get("title"),
        r.get("brand"),
        r.get("categories"),
        r.get("description"),
        image=first_image(r.get("imUrl")),
        price=r.get("price") if isinstance(r.get("price"), (int, float)) else None,
        sales_type=sales_type,
        sales_rank=sales_rank,
    )


def amazon2018_item(r: dict) -> dict:
    return make_item(
        parse_id(r.get("asin"), "asin"),
        r.get("title"),
        r.get("brand"),
        r.get("category"),
        r.get("description"),
        image=first_image(r.get("imageURLHighRes"), r.get("imageURL"), r.get("image")),
        price=clean_text(r.get("price")) or None,
    )


def amazon2023_item(r: dict) -> dict:
    return make_item(
        parse_id(r.get("parent_asin"), "parent_asin"),
        r.get("title"),
        r.get("store"),
        r.get("categories"),
        r.get("description"),
        image=first_image(r.get("images")),
        price=r.get("price") if isinstance(r.get("price"), (int, float)) else None,
    )


def read_amazon(
    cfg: DataConfig,
    review_names: list[str],
    meta_names: list[str],
    keys: tuple[str, str, str, str],
    parse_meta: Callable[[bytes], dict],
    to_item: Callable[[dict], dict],
    time_scale: float = 1.0,
) -> RawSource:
    directory = data_dir(cfg)
    reviews = find_file(directory, review_names, f"{cfg.format} reviews of data.name={cfg.name!r}")
    meta = find_file(directory, meta_names, f"{cfg.format} metadata of data.name={cfg.name!r}")
    report = BadLineReport(cfg.on_bad_line)
    return RawSource(
        interactions=lambda: json_interactions(reviews, report, keys, cfg.min_rating, time_scale),
        items=lambda: json_items(meta, report, parse_meta, to_item),
        has_timestamps=True,
        report=report,
        description=f"{cfg.format} {cfg.name}: {reviews} + {meta}",
    )


def read_amazon2014(cfg: DataConfig) -> RawSource:
    name = need_name(cfg, "Beauty (for reviews_Beauty_5.json.gz)")
    return read_amazon(
        cfg,
        [f"reviews_{name}_5.json", f"reviews_{name}.json"],
        [f"meta_{name}.json"],
        ("reviewerID", "asin", "overall", "unixReviewTime"),
        parse_literal_object,
        amazon2014_item,
    )


def read_amazon2018(cfg: DataConfig) -> RawSource:
    name = need_name(cfg, "Industrial_and_Scientific (for Industrial_and_Scientific_5.json.gz)")
    return read_amazon(
        cfg,
        [f"{name}_5.json", f"{name}.json"],
        [f"meta_{name}.json"],
        ("reviewerID", "asin", "overall", "unixReviewTime"),
        parse_json_object,
        amazon2018_item,
    )


def read_amazon2023(cfg: DataConfig) -> RawSource:
    name = need_name(cfg, "All_Beauty (for All_Beauty.jsonl.gz)")
    return read_amazon(
        cfg,
        [f"{name}.jsonl"],
        [f"meta_{name}.jsonl"],
        ("user_id", "parent_asin", "rating", "timestamp"),
        parse_json_object,
        amazon2023_item,
        # 2023 timestamps are in milliseconds.
        time_scale=1000.0,
    )


# --------------------------------------------------------------------------- LC-Rec


def item_index(value: Any) -> str:
    """An LC-Rec item index: a non-negative int (or its digits as a string)."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise ValueError(f"item index {value!r} is not a non-negative integer")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"item index {value} is negative")
    return str(int(value))


def lcrec_interactions(path: Path, report: BadLineReport) -> Iterator[Interaction]:
    doc, text = read_json_document(path)
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a JSON object {{user_idx: [item_idx, ...]}}, got {type(doc).__name__}")
    for user, seq in doc.items():
        try:
            if not isinstance(seq, list) or not seq:
                raise ValueError(f"user {user!r}: expected a non-empty list of item indices")
            items = [item_index(v) for v in seq]
        except ValueError as exc:
            report.bad(str(path), key_line(text, user), f"user {user!r}: {exc}")
            continue
        # No timestamps: the position in the (chronological) list orders the sequence.
        for pos, item in enumerate(items):
            yield Interaction(str(user), item, float(pos))


def lcrec_items(path: Path, report: BadLineReport) -> Iterator[dict]:
    doc, text = read_json_document(path)
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a JSON object {{item_idx: {{title, ...}}}}, got {type(doc).__name__}")
    for key, meta in doc.items():
        try:
            raw_id = item_index(key)
            if not isinstance(meta, dict):
                raise ValueError(f"expected an object of item fields, got {type(meta).__name__}")
        except ValueError as exc:
            report.bad(str(path), key_line(text, key), f"item {key!r}: {exc}")
            continue
        extra = {
            k: v
            for k, v in meta.items()
            if k not in ("title", "brand", "categories", "description", "item") and isinstance(v, (str, int, float))
        }
        yield make_item(
            raw_id, meta.get("title"), meta.get("brand"), meta.get("categories"), meta.get("description"), **extra
        )


def read_lcrec(cfg: DataConfig) -> RawSource:
    directory = data_dir(cfg)
    name = need_name(cfg, "Beauty (for Beauty.inter.json)")
    no_ratings(cfg, "the LC-Rec format")
    inter = find_file(directory, [f"{name}.inter.json"], "LC-Rec interactions")
    item = find_file(directory, [f"{name}.item.json"], "LC-Rec item table")
    report = BadLineReport(cfg.on_bad_line)
    return RawSource(
        interactions=lambda: lcrec_interactions(inter, report),
        items=lambda: lcrec_items(item, report),
        has_timestamps=False,
        report=report,
        description=f"lcrec {name}: {inter} + {item}",
    )


# --------------------------------------------------------------------------- RecBole atomic files


def atomic_rows(path: Path, report: BadLineReport) -> Iterator[tuple[int, dict[str, str], dict[str, str]]]:
    """(line number, {field: value}, {field: type}) of a RecBole atomic file, streamed.

    The header is ``name:type`` per column, tab separated; values may be CSV-quoted (a quoted
    field can hold tabs and newlines), so rows go through the csv module.
    """
    # A description can be longer than the csv module's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))
    reader = csv.reader(iter_text_lines(path, report), delimiter="\t")
    header = next(reader, None)
    if not header:
        raise BadInput(f"{path}: line 1: empty file, expected a header such as 'item_id:token<TAB>title:token'")
    names = [h.split(":", 1)[0] for h in header]
    types = {n: (h.split(":", 1)[1] if ":" in h else "token") for n, h in zip(names, header)}
    end = reader.line_num
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            end = reader.line_num
            report.bad(str(path), start, f"unreadable CSV ({exc})")
            continue
        end = reader.line_num
        if not row or row == [""]:
            continue
        if len(row) != len(names):
            report.bad(str(path), start, f"{len(row)} tab-separated columns, the header has {len(names)}")
            continue
        yield start, dict(zip(names, row)), types


def token_seq(value: str) -> list[str]:
    """A RecBole ``token_seq`` value: space-separated tokens, or quoted ones (``'Beauty', 'Face'``)."""
    value = value.strip()
    if value[:1] in ("'", '"'):
        parsed = ast.literal_eval("[" + value + "]")
        if not all(isinstance(v, str) for v in parsed):
            raise ValueError(f"not a list of quoted strings: {value[:80]!r}")
        return parsed
    return value.split()


# RecBole item-table columns that fill our text fields (ML-100K: movie_title, class).
ATOMIC_TITLE = ("title", "movie_title")
ATOMIC_CATEGORIES = ("categories", "class", "genre")


def atomic_item(raw_id: str, row: dict[str, str], types: dict[str, str]) -> dict:
    """An item dict from one item-table row; float columns typed, the rest kept as strings.

    When ``raw_id`` is not the table's own item_id (S3-Rec: an integer id), that one is kept as ``asin``.
    """
    fields: dict[str, Any] = {"title": "", "brand": "", "categories": "", "description": ""}
    extra: dict[str, Any] = {}
    for name, value in row.items():
        if name == "item_id":
            if value.strip() != raw_id:
                extra["asin"] = value.strip()
        elif name in ATOMIC_TITLE:
            fields["title"] = value
        elif name in ATOMIC_CATEGORIES:
            fields["categories"] = token_seq(value) if types[name] == "token_seq" else value
        elif name in ("brand", "description"):
            fields[name] = value
        elif types[name] == "float":
            extra[name] = parse_number(value, name) if value.strip() else None
        else:
            extra[name] = clean_text(value)
    return make_item(raw_id, fields["title"], fields["brand"], fields["categories"], fields["description"], **extra)


def atomic_items(path: Path, report: BadLineReport, to_raw_id: Callable[[str], str | None]) -> Iterator[dict]:
    """Item dicts of a RecBole ``.item`` table; rows whose item_id maps to None are not in the data."""
    for line_no, row, types in atomic_rows(path, report):
        raw_id = to_raw_id(row["item_id"].strip())
        if raw_id is None:
            continue
        try:
            yield atomic_item(raw_id, row, types)
        except (ValueError, SyntaxError) as exc:
            report.bad(str(path), line_no, str(exc))


def atomic_header(path: Path, required: tuple[str, ...]) -> list[str]:
    """Column names of an atomic file's header, read at open time so a wrong file fails before any work."""
    with open_binary(path) as f:
        first = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
    columns = [h.split(":", 1)[0] for h in first.split("\t")]
    missing = [c for c in required if c not in columns]
    if missing:
        raise BadInput(f"{path}: line 1: the header has no {' or '.join(missing)} column (it has {columns})")
    return columns


def atomic_interactions(path: Path, report: BadLineReport, min_rating: float) -> Iterator[Interaction]:
    position: dict[str, int] = {}
    for line_no, row, _ in atomic_rows(path, report):
        try:
            user = parse_id(row["user_id"], "user_id")
            item = parse_id(row["item_id"], "item_id")
            rating = parse_number(row["rating"], "rating") if "rating" in row else None
            if "timestamp" in row:
                timestamp = parse_number(row["timestamp"], "timestamp")
            else:
                # No timestamp column: the file order of the user's rows is their order.
                timestamp = float(position.get(user, 0))
                position[user] = int(timestamp) + 1
        except ValueError as exc:
            report.bad(str(path), line_no, str(exc))
            continue
        if rating is None or rating >= min_rating:
            yield Interaction(user, item, timestamp, rating)


def read_recbole_files(directory: Path, name: str, cfg: DataConfig, label: str) -> RawSource:
    inter = find_file(directory, [f"{name}.inter"], "RecBole interactions")
    item = find_file(directory, [f"{name}.item"], "RecBole item table")
    columns = atomic_header(inter, ("user_id", "item_id"))
    atomic_header(item, ("item_id",))
    if "rating" not in columns:
        no_ratings(cfg, str(inter))
    report = BadLineReport(cfg.on_bad_line)
    return RawSource(
        interactions=lambda: atomic_interactions(inter, report, cfg.min_rating),
        items=lambda: atomic_items(item, report, lambda raw: raw),
        has_timestamps="timestamp" in columns,
        report=report,
        description=f"{label}: {inter} + {item}",
    )


def read_recbole(cfg: DataConfig) -> RawSource:
    name = need_name(cfg, "ml-100k (for ml-100k.inter)")
    return read_recbole_files(data_dir(cfg), name, cfg, f"recbole {name}")


def read_ml100k(cfg: DataConfig) -> RawSource:
    from genrec.data.fetch import fetch_ml100k

    if cfg.name not in ("", "ml-100k"):
        raise ValueError(f"data.name={cfg.name!r} with data.format=ml-100k: leave data.name empty")
    directory = fetch_ml100k(Path(cfg.path).expanduser() if cfg.path else None)
    return read_recbole_files(directory, "ml-100k", cfg, "ml-100k (RecBole atomic files)")


# --------------------------------------------------------------------------- S3-Rec / P5


def s3rec_interactions(path: Path, report: BadLineReport) -> Iterator[Interaction]:
    for line_no, line in iter_lines(path):
        try:
            tokens = line.decode("utf-8").split()
        except UnicodeDecodeError as exc:
            report.bad(str(path), line_no, f"not UTF-8 text ({exc.reason})")
            continue
        if len(tokens) < 2 or not all(t.isdigit() for t in tokens):
            report.bad(str(path), line_no, "expected 'user item item ...' as positive integers")
            continue
        # No timestamps: S3-Rec lines are already in chronological order.
        for pos, item in enumerate(tokens[1:]):
            yield Interaction(tokens[0], item, float(pos))


def s3rec_items(datamaps: Path, table: Path, report: BadLineReport) -> Iterator[dict]:
    """Item table rows joined to the .txt's integer ids through datamaps' id2item (id -> ASIN)."""
    maps, _ = read_json_document(datamaps)
    id2item = maps.get("id2item") if isinstance(maps, dict) else None
    if not isinstance(id2item, dict):
        raise BadInput(f"{datamaps}: expected the P5 maps with an 'id2item' object (item id -> ASIN)")
    asin_to_id = {str(asin): str(i) for i, asin in id2item.items()}
    yield from atomic_items(table, report, asin_to_id.get)


def read_s3rec(cfg: DataConfig) -> RawSource:
    directory = data_dir(cfg)
    name = need_name(cfg, "Beauty (for Beauty.txt)")
    no_ratings(cfg, "the S3-Rec format")
    seq = find_file(directory, [f"{name}.txt"], "S3-Rec sequences")
    datamaps = find_file(directory, ["datamaps.json"], "P5 id maps")
    table = find_file(directory, [f"Amazon_{name}.item", f"{name}.item"], "RecBole item table")
    atomic_header(table, ("item_id",))
    report = BadLineReport(cfg.on_bad_line)
    return RawSource(
        interactions=lambda: s3rec_interactions(seq, report),
        items=lambda: s3rec_items(datamaps, table, report),
        has_timestamps=False,
        report=report,
        description=f"s3rec {name}: {seq} + {datamaps} + {table}",
    )


# --------------------------------------------------------------------------- generic CSV / Parquet


CSV_INTER_COLUMNS = ("user_id", "item_id", "timestamp")
CSV_ITEM_COLUMNS = ("item_id", "title")
TABLE_SUFFIXES = ("csv", "csv.gz", "parquet")


def table_rows(path: Path, report: BadLineReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, {column: value}) of a CSV (gzip or plain) or Parquet table, streamed."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        row_no = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            columns = batch.to_pydict()
            for values in zip(*columns.values()):
                row_no += 1
                yield row_no, dict(zip(columns, values))
        return
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))
    reader = csv.reader(iter_text_lines(path, report))
    header = next(reader, [])
    end = reader.line_num
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            end = reader.line_num
            report.bad(str(path), start, f"unreadable CSV ({exc})")
            continue
        end = reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            report.bad(str(path), start, f"{len(row)} comma-separated columns, the header has {len(header)}")
            continue
        yield start, dict(zip(header, row))


def table_columns(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    with open_binary(path) as f:
        first = f.readline().decode("utf-8", errors="replace")
    return next(csv.reader([first]), [])


def table_interactions(path: Path, report: BadLineReport, min_rating: float) -> Iterator[Interaction]:
    for row_no, row in table_rows(path, report):
        try:
            user = parse_id(row["user_id"], "user_id")
            item = parse_id(row["item_id"], "item_id")
            timestamp = parse_time(row["timestamp"], "timestamp")
            value = row.get("rating")
            rating = None if value is None or value == "" else parse_number(value, "rating")
        except ValueError as exc:
            report.bad(str(path), row_no, str(exc))
            continue
        if rating is None or rating >= min_rating:
            yield Interaction(user, item, timestamp, rating)


def table_items(path: Path, report: BadLineReport) -> Iterator[dict]:
    for row_no, row in table_rows(path, report):
        try:
            raw_id = parse_id(row["item_id"], "item_id")
        except ValueError as exc:
            report.bad(str(path), row_no, str(exc))
            continue
        extra = {k: v for k, v in row.items() if k not in ("item_id", "title", "brand", "categories", "description")}
        yield make_item(
            raw_id, row.get("title"), row.get("brand"), row.get("categories"), row.get("description"), **extra
        )


def require_columns(path: Path, required: Iterable[str]) -> list[str]:
    columns = table_columns(path)
    missing = [c for c in required if c not in columns]
    if missing:
        raise BadInput(f"{path}: header/schema lacks column(s) {', '.join(missing)} (it has {', '.join(columns)})")
    return columns


def read_table(cfg: DataConfig) -> RawSource:
    directory = data_dir(cfg)
    name = need_name(cfg, "mydata (for mydata.inter.csv)")
    inter = find_file(directory, [f"{name}.inter.{ext}" for ext in TABLE_SUFFIXES], "interactions table", gz=False)
    item = find_file(directory, [f"{name}.item.{ext}" for ext in TABLE_SUFFIXES], "item table", gz=False)
    if "rating" not in require_columns(inter, CSV_INTER_COLUMNS):
        no_ratings(cfg, str(inter))
    require_columns(item, CSV_ITEM_COLUMNS)
    report = BadLineReport(cfg.on_bad_line)
    return RawSource(
        interactions=lambda: table_interactions(inter, report, cfg.min_rating),
        items=lambda: table_items(item, report),
        has_timestamps=True,
        report=report,
        description=f"csv {name}: {inter} + {item}",
    )


# --------------------------------------------------------------------------- dispatch


READERS: dict[str, Callable[[DataConfig], RawSource]] = {
    "ml-100k": read_ml100k,
    "amazon2014": read_amazon2014,
    "amazon2018": read_amazon2018,
    "amazon2023": read_amazon2023,
    "lcrec": read_lcrec,
    "s3rec": read_s3rec,
    "recbole": read_recbole,
    "csv": read_table,
}


def open_source(cfg: DataConfig) -> RawSource:
    """The raw data ``cfg`` names, as streams; missing files and bad headers fail here, before any reading."""
    reader = READERS.get(cfg.format)
    if reader is None:
        raise ValueError(f"data.format={cfg.format!r} is not a known format: use one of {', '.join(READERS)}")
    return reader(cfg)
