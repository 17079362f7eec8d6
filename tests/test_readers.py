"""Each reader on small files written in the exact upstream format, plus the real shared data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import shared_data_or_skip
from genrec.config import DataConfig
from genrec.data.raw import BadInput
from genrec.data.readers import READERS, open_source


def write(path: Path, text: str) -> Path:
    """Write ``text`` gzipped when the name ends with .gz, else plain."""
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def cfg(fmt: str, path: Path, name: str = "", **kw) -> DataConfig:
    return DataConfig(format=fmt, path=str(path), name=name, **kw)


def read_all(source):
    return list(source.interactions()), {m["item"]: m for m in source.items()}


# --------------------------------------------------------------------------- amazon2014

REVIEWS_2014 = """\
{"reviewerID": "A1YJEY40YUW4SE", "asin": "7806397051", "reviewerName": "Andrea", "helpful": [3, 4], "reviewText": "Very oily and creamy.", "overall": 1.0, "summary": "Don't waste your money", "unixReviewTime": 1391040000, "reviewTime": "01 30, 2014"}
{"reviewerID": "A60XNB876KYML", "asin": "7806397051", "reviewerName": "Jessica H.", "helpful": [1, 1], "reviewText": "Nice colors.", "overall": 3.0, "summary": "Ok Palette!", "unixReviewTime": 1397779200, "reviewTime": "04 18, 2014"}

{"reviewerID": "A60XNB876KYML", "asin": "9788072216", "helpful": [0, 0], "reviewText": "Smells great.", "overall": 5.0, "summary": "Love it", "unixReviewTime": 1378425600, "reviewTime": "09 6, 2013"}
"""
META_2014 = """\
{'asin': '7806397051', 'description': 'A 15 color\\ncamouflage palette.', 'title': 'WAWO 15 Color Professionl Makeup Eyeshadow Camouflage Facial Concealer Neutral Palette', 'price': 5.04, 'imUrl': 'http://ecx.images-amazon.com/images/I/31MfMFsh1-L._SY300_.jpg', 'related': {'also_bought': ['B00C3CF7RU'], 'bought_together': ['B00JRRBRMM']}, 'salesRank': {'Beauty': 10486}, 'brand': 'COKA', 'categories': [['Beauty', 'Makeup', 'Face', 'Concealers & Neutralizers'], ['Beauty', 'Makeup', 'Eyes']]}
{'asin': '9788072216', 'title': "Prada Candy By Prada Eau De Parfum Spray 1.7 Oz For Women's &amp; Men", 'salesRank': {'Beauty': 78916}, 'categories': [['Beauty']]}
"""


def test_amazon2014_reviews_and_literal_meta(tmp_path):
    write(tmp_path / "reviews_Beauty_5.json.gz", REVIEWS_2014)
    write(tmp_path / "meta_Beauty.json.gz", META_2014)
    source = open_source(cfg("amazon2014", tmp_path, "Beauty"))
    inter, items = read_all(source)
    assert [(i.user, i.item, i.timestamp, i.rating) for i in inter] == [
        ("A1YJEY40YUW4SE", "7806397051", 1391040000.0, 1.0),
        ("A60XNB876KYML", "7806397051", 1397779200.0, 3.0),
        ("A60XNB876KYML", "9788072216", 1378425600.0, 5.0),
    ]
    assert source.has_timestamps
    assert items["7806397051"] == {
        "item": "7806397051",
        "title": "WAWO 15 Color Professionl Makeup Eyeshadow Camouflage Facial Concealer Neutral Palette",
        "brand": "COKA",
        "categories": "Beauty, Makeup, Face, Concealers & Neutralizers",  # the first path only
        "description": "A 15 color camouflage palette.",  # newline -> space
        "image": "http://ecx.images-amazon.com/images/I/31MfMFsh1-L._SY300_.jpg",
        "price": 5.04,
        "sales_type": "Beauty",
        "sales_rank": 10486,
    }
    assert items["9788072216"]["title"] == "Prada Candy By Prada Eau De Parfum Spray 1.7 Oz For Women's & Men"
    assert items["9788072216"]["brand"] == "" and items["9788072216"]["description"] == ""
    high = open_source(cfg("amazon2014", tmp_path, "Beauty", min_rating=3.0))
    assert [i.rating for i in high.interactions()] == [3.0, 5.0]


def test_meta_literals_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    write(tmp_path / "reviews_X_5.json", REVIEWS_2014)
    write(tmp_path / "meta_X.json", f"__import__('pathlib').Path({str(marker)!r}).touch()\n")
    source = open_source(cfg("amazon2014", tmp_path, "X", on_bad_line="skip"))
    assert list(source.items()) == []
    assert not marker.exists()
    assert source.report.skipped == {str(tmp_path / "meta_X.json"): 1}


def test_bad_lines_raise_with_file_and_line_or_are_counted(tmp_path):
    lines = REVIEWS_2014.splitlines()
    bad = [
        lines[0],
        '{"reviewerID": "A1", "asin": "B1", "overall": 5.0',  # line 2: truncated JSON
        '{"reviewerID": "A1", "overall": 5.0, "unixReviewTime": 1}',  # line 3: no asin
        '{"reviewerID": "A1", "asin": "B1", "overall": "five", "unixReviewTime": 1}',  # line 4: rating
        '["not", "an", "object"]',  # line 5
        lines[1],
    ]
    path = write(tmp_path / "reviews_X_5.json.gz", "\n".join(bad) + "\n")
    write(tmp_path / "meta_X.json.gz", META_2014)
    strict = open_source(cfg("amazon2014", tmp_path, "X"))
    stream = strict.interactions()
    assert next(stream).user == "A1YJEY40YUW4SE"  # streamed: line 2 is parsed only when asked for
    with pytest.raises(BadInput, match=rf"{path.name}: line 2: .*on_bad_line=skip"):
        next(stream)
    for line_no, why in [
        (3, "asin is missing"),
        (4, "overall is 'five', not a number"),
        (5, "expected a JSON object, got list"),
    ]:
        path.write_bytes(gzip.compress("\n".join([lines[0], *bad[line_no - 1 : line_no]]).encode()))
        with pytest.raises(BadInput, match=f"line 2: {why}"):
            list(open_source(cfg("amazon2014", tmp_path, "X")).interactions())
    path.write_bytes(gzip.compress("\n".join(bad).encode()))
    lenient = open_source(cfg("amazon2014", tmp_path, "X", on_bad_line="skip"))
    assert len(list(lenient.interactions())) == 2
    assert lenient.report.skipped == {str(path): 4}
    assert lenient.report.examples[0].startswith(f"{path}: line 2:")


def test_gzip_is_told_by_magic_bytes_not_suffix(tmp_path):
    (tmp_path / "reviews_X_5.json").write_bytes(gzip.compress(REVIEWS_2014.encode()))
    write(tmp_path / "meta_X.json.gz", META_2014)
    assert len(list(open_source(cfg("amazon2014", tmp_path, "X")).interactions())) == 3


# --------------------------------------------------------------------------- amazon2018 / 2023

REVIEWS_2018 = """\
{"overall": 5.0, "verified": true, "reviewTime": "11 27, 2017", "reviewerID": "A1SBDEHPA0ISY2", "asin": "B000OCEWGW", "style": {"Size:": " 1 Pack"}, "reviewerName": "Ramon", "reviewText": "Works.", "summary": "Five Stars", "unixReviewTime": 1511740800}
{"overall": 2.0, "vote": "3", "verified": false, "reviewTime": "01 2, 2018", "reviewerID": "A2XYZ", "asin": "B000OCEWGW", "reviewText": "Meh.", "summary": "Two", "unixReviewTime": 1514851200}
"""
META_2018 = """\
{"category": ["Industrial &amp; Scientific", "Test, Measure &amp; Inspect", "Multimeters"], "tech1": "", "description": ["Digital multimeter.", "True RMS."], "fit": "", "title": "Fluke 117 Electricians True RMS Multimeter &amp; More", "also_buy": [], "tech2": "", "brand": "Fluke", "feature": [], "rank": ">#1,234 in Industrial &amp; Scientific (", "also_view": [], "main_cat": "Industrial &amp; Scientific", "similar_item": "", "date": "", "price": "$189.99", "asin": "B000OCEWGW", "imageURL": ["https://images-na.ssl-images-amazon.com/images/I/41kB0.SS40_.jpg"], "imageURLHighRes": ["https://images-na.ssl-images-amazon.com/images/I/41kB0.jpg"]}
"""


def test_amazon2018(tmp_path):
    write(tmp_path / "Industrial_and_Scientific_5.json.gz", REVIEWS_2018)
    write(tmp_path / "meta_Industrial_and_Scientific.json.gz", META_2018)
    inter, items = read_all(open_source(cfg("amazon2018", tmp_path, "Industrial_and_Scientific")))
    assert [(i.user, i.item, i.timestamp, i.rating) for i in inter] == [
        ("A1SBDEHPA0ISY2", "B000OCEWGW", 1511740800.0, 5.0),
        ("A2XYZ", "B000OCEWGW", 1514851200.0, 2.0),
    ]
    assert items["B000OCEWGW"] == {
        "item": "B000OCEWGW",
        "title": "Fluke 117 Electricians True RMS Multimeter & More",
        "brand": "Fluke",
        "categories": "Industrial & Scientific, Test, Measure & Inspect, Multimeters",
        "description": "Digital multimeter. True RMS.",
        "image": "https://images-na.ssl-images-amazon.com/images/I/41kB0.jpg",
        "price": "$189.99",
    }


REVIEWS_2023 = """\
{"rating": 5.0, "title": "Such a lovely scent", "text": "This spray is really nice.", "images": [], "asin": "B00YQ6X8EO", "parent_asin": "B00YQ6X8EO", "user_id": "AGKHLEW2SOWHNMFQIJGBECAF7INQ", "timestamp": 1588687728923, "helpful_vote": 0, "verified_purchase": true}
{"rating": 4.0, "title": "Good", "text": "Variant of the same product.", "images": [], "asin": "B07CHILD01", "parent_asin": "B01CUPMQZE", "user_id": "AGKHLEW2SOWHNMFQIJGBECAF7INQ", "timestamp": 1588687729000, "helpful_vote": 1, "verified_purchase": false}
"""
META_2023 = """\
{"main_category": "All Beauty", "title": "Howard LC0008 Leather Conditioner, 8-Ounce (4-Pack)", "average_rating": 4.8, "rating_number": 10, "features": [], "description": ["Conditions leather.", "Made in USA."], "price": null, "images": [{"thumb": "https://m.media-amazon.com/images/I/41qfjSfqNyL._SS40_.jpg", "large": "https://m.media-amazon.com/images/I/41qfjSfqNyL.jpg", "variant": "MAIN", "hi_res": null}], "videos": [], "store": "Howard Products", "categories": ["Beauty", "Skin Care"], "details": {"UPC": "617390882781"}, "parent_asin": "B01CUPMQZE", "bought_together": null}
"""


def test_amazon2023_parent_asin_and_millisecond_timestamps(tmp_path):
    write(tmp_path / "All_Beauty.jsonl", REVIEWS_2023)
    write(tmp_path / "meta_All_Beauty.jsonl.gz", META_2023)
    inter, items = read_all(open_source(cfg("amazon2023", tmp_path, "All_Beauty")))
    assert [(i.item, i.timestamp, i.rating) for i in inter] == [
        ("B00YQ6X8EO", 1588687728.923, 5.0),
        ("B01CUPMQZE", 1588687729.0, 4.0),
    ]
    assert items["B01CUPMQZE"] == {
        "item": "B01CUPMQZE",
        "title": "Howard LC0008 Leather Conditioner, 8-Ounce (4-Pack)",
        "brand": "Howard Products",
        "categories": "Beauty, Skin Care",
        "description": "Conditions leather. Made in USA.",
        "image": "https://m.media-amazon.com/images/I/41qfjSfqNyL.jpg",
    }


# --------------------------------------------------------------------------- lcrec

LCREC_INTER = '{\n    "0": [\n        0,\n        1,\n        2\n    ],\n    "1": [\n        2,\n        10\n    ]\n}'
LCREC_ITEMS = {
    "0": {"title": "OPI Nail Lacquer", "description": "", "brand": "OPI", "categories": "Beauty, Makeup, Nails"},
    "1": {"title": "Red &amp; Shatter", "description": ["Line one.", "Line\ntwo."], "brand": "OPI", "categories": ""},
    "2": {"title": "BB Cream", "brand": "", "categories": ["Beauty", "Skin Care"], "asin": "B0020YLEYK"},
    "10": {"title": "Ten", "description": "", "brand": "", "categories": ""},
}


def test_lcrec_positions_as_time(tmp_path):
    write(tmp_path / "Beauty.inter.json.gz", LCREC_INTER)
    write(tmp_path / "Beauty.item.json", json.dumps(LCREC_ITEMS, indent=1))
    source = open_source(cfg("lcrec", tmp_path, "Beauty"))
    inter, items = read_all(source)
    assert [tuple(i) for i in inter] == [
        ("0", "0", 0.0, None),
        ("0", "1", 1.0, None),
        ("0", "2", 2.0, None),
        ("1", "2", 0.0, None),
        ("1", "10", 1.0, None),
    ]
    assert not source.has_timestamps
    assert items["1"] == {
        "item": "1",
        "title": "Red & Shatter",
        "brand": "OPI",
        "categories": "",
        "description": "Line one. Line two.",
    }
    assert items["2"]["categories"] == "Beauty, Skin Care" and items["2"]["asin"] == "B0020YLEYK"
    with pytest.raises(ValueError, match="min_rating=4.0 but the LC-Rec format has no ratings"):
        open_source(cfg("lcrec", tmp_path, "Beauty", min_rating=4.0))


def test_lcrec_bad_entry_names_its_line(tmp_path):
    inter = write(tmp_path / "X.inter.json", '{\n  "0": [0, 1],\n  "1": [2, "x"],\n  "2": [3]\n}')
    write(tmp_path / "X.item.json", "{}")
    with pytest.raises(BadInput, match=r"X\.inter\.json: line 3: user '1': item index 'x'"):
        list(open_source(cfg("lcrec", tmp_path, "X")).interactions())
    lenient = open_source(cfg("lcrec", tmp_path, "X", on_bad_line="skip"))
    assert [i.item for i in lenient.interactions()] == ["0", "1", "3"]
    assert lenient.report.skipped == {str(inter): 1}
    write(tmp_path / "X.inter.json", '{\n  "0": [0, 1],\n  "1": [2\n}')
    with pytest.raises(BadInput, match=r"X\.inter\.json: line 4: not valid JSON"):
        list(open_source(cfg("lcrec", tmp_path, "X", on_bad_line="skip")).interactions())


# --------------------------------------------------------------------------- s3rec

S3REC_TXT = "1 1 2 3\n2 3 2\n"
DATAMAPS = {
    "user2id": {"A1YJEY40YUW4SE": "1", "A60XNB876KYML": "2"},
    "item2id": {"7806397051": "1", "9759091062": "2", "9788072216": "3"},
    "id2item": {"1": "7806397051", "2": "9759091062", "3": "9788072216"},
}
# Tab separated with CSV quoting, as Amazon_Beauty.item: a quoted newline in a title, a
# category with an apostrophe (""Women's""), doubly escaped entities, and an item outside
# the dataset.
S3REC_ITEM = (
    "item_id:token\ttitle:token\tsales_type:token\tsales_rank:float\tcategories:token_seq\tprice:float\tbrand:token\n"
    "7806397051\tWAWO 15 Color Palette\tBeauty\t10486.0\t'Beauty', 'Makeup', 'Face', 'Concealers & Neutralizers'\t5.04\tCOKA\n"
    "9759091062\t\"Xtreme Brite\nBrightening Gel 1oz.\"\tBeauty\t52254.0\t'Beauty', 'Hair Care'\t\tKirk&amp;#39;s Soap\n"
    "B000NOTINDATA\tNot in the dataset\tBeauty\t1.0\t'Beauty'\t1.0\tX\n"
    "9788072216\tPrada Candy\tBeauty\t78916.0\t\"'Beauty', 'Fragrance', \"\"Women's\"\", 'Eau de Parfum'\"\t65.86\tPrada\n"
)


def test_s3rec_joins_item_table_through_datamaps(tmp_path):
    write(tmp_path / "Beauty.txt.gz", S3REC_TXT)
    write(tmp_path / "datamaps.json.gz", json.dumps(DATAMAPS))
    write(tmp_path / "Amazon_Beauty.item.gz", S3REC_ITEM)
    source = open_source(cfg("s3rec", tmp_path, "Beauty"))
    inter, items = read_all(source)
    assert [(i.user, i.item, i.timestamp) for i in inter] == [
        ("1", "1", 0.0),
        ("1", "2", 1.0),
        ("1", "3", 2.0),
        ("2", "3", 0.0),
        ("2", "2", 1.0),
    ]
    assert not source.has_timestamps
    assert sorted(items) == ["1", "2", "3"]
    assert items["1"] == {
        "item": "1",
        "title": "WAWO 15 Color Palette",
        "brand": "COKA",
        "categories": "Beauty, Makeup, Face, Concealers & Neutralizers",
        "description": "",
        "asin": "7806397051",
        "sales_type": "Beauty",
        "sales_rank": 10486.0,
        "price": 5.04,
    }
    assert items["2"]["title"] == "Xtreme Brite Brightening Gel 1oz."
    assert items["2"]["brand"] == "Kirk's Soap" and "price" not in items["2"]
    assert items["3"]["categories"] == "Beauty, Fragrance, Women's, Eau de Parfum"


def test_s3rec_bad_lines(tmp_path):
    seq = write(tmp_path / "Beauty.txt", "1 1 2\n2 x 3\n3\n4 5 6\n")
    write(tmp_path / "datamaps.json", json.dumps(DATAMAPS))
    # The bad row comes after a record spanning lines 3-4, so its line number is 5.
    table = write(tmp_path / "Amazon_Beauty.item", S3REC_ITEM.replace("\tKirk&amp;#39;s Soap\n", "\tK\nBAD\trow\n"))
    with pytest.raises(BadInput, match=r"Beauty\.txt: line 2: expected 'user item item \.\.\.'"):
        list(open_source(cfg("s3rec", tmp_path, "Beauty")).interactions())
    with pytest.raises(BadInput, match=r"Amazon_Beauty\.item: line 5: 2 tab-separated columns, the header has 7"):
        list(open_source(cfg("s3rec", tmp_path, "Beauty")).items())
    lenient = open_source(cfg("s3rec", tmp_path, "Beauty", on_bad_line="skip"))
    assert [(i.user, i.item) for i in lenient.interactions()] == [("1", "1"), ("1", "2"), ("4", "5"), ("4", "6")]
    assert len(list(lenient.items())) == 3
    assert lenient.report.skipped == {str(seq): 2, str(table): 1}


# --------------------------------------------------------------------------- recbole

ML_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
)
ML_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "242\tKolya\t1996\tComedy\n302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
    "377\tHeavyweights\t1994\tChildren's Comedy\n"
)


def test_recbole_ml100k_layout(tmp_path):
    write(tmp_path / "ml-100k.inter", ML_INTER)
    write(tmp_path / "ml-100k.item", ML_ITEM)
    source = open_source(cfg("recbole", tmp_path, "ml-100k"))
    inter, items = read_all(source)
    assert [tuple(i) for i in inter] == [
        ("196", "242", 881250949.0, 3.0),
        ("186", "302", 891717742.0, 3.0),
        ("22", "377", 878887116.0, 1.0),
    ]
    assert source.has_timestamps
    assert items["302"] == {
        "item": "302",
        "title": "L.A. Confidential",
        "brand": "",
        "categories": "Crime, Film-Noir, Mystery, Thriller",
        "description": "",
        "release_year": "1997",
    }
    assert [i.item for i in open_source(cfg("recbole", tmp_path, "ml-100k", min_rating=2)).interactions()] == [
        "242",
        "302",
    ]


def test_recbole_bad_rows_and_headers(tmp_path):
    inter = write(tmp_path / "d.inter", ML_INTER + "7\t8\t4\n9\t10\t5\tyesterday\n")
    write(tmp_path / "d.item", ML_ITEM)
    with pytest.raises(BadInput, match=r"d\.inter: line 5: 3 tab-separated columns, the header has 4"):
        list(open_source(cfg("recbole", tmp_path, "d")).interactions())
    lenient = open_source(cfg("recbole", tmp_path, "d", on_bad_line="skip"))
    assert len(list(lenient.interactions())) == 3
    assert lenient.report.skipped == {str(inter): 2}
    assert "line 6: timestamp is 'yesterday', not a number" in lenient.report.examples[1]
    # Without a timestamp column the file order is the order; without ratings min_rating is refused.
    write(tmp_path / "d.inter", "user_id:token\titem_id:token\nu1\ta\nu2\tb\nu1\tc\n")
    source = open_source(cfg("recbole", tmp_path, "d"))
    assert not source.has_timestamps
    assert [(i.user, i.item, i.timestamp) for i in source.interactions()] == [
        ("u1", "a", 0.0),
        ("u2", "b", 0.0),
        ("u1", "c", 1.0),
    ]
    with pytest.raises(ValueError, match="min_rating=1.0 but .*d.inter has no ratings"):
        open_source(cfg("recbole", tmp_path, "d", min_rating=1.0))
    write(tmp_path / "d.inter", "uid:token\titem_id:token\nu1\ta\n")
    with pytest.raises(BadInput, match=r"d\.inter: line 1: the header has no user_id column"):
        open_source(cfg("recbole", tmp_path, "d"))


def test_non_utf8_and_non_finite_values_are_bad_lines(tmp_path):
    inter = tmp_path / "d.inter"
    inter.write_bytes(b"user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\xff\tj\t2\nu\tk\tnan\nu\tl\t3\n")
    write(tmp_path / "d.item", "item_id:token\ttitle:token\n")
    with pytest.raises(BadInput, match=r"d\.inter: line 3: not UTF-8 text"):
        list(open_source(cfg("recbole", tmp_path, "d")).interactions())
    lenient = open_source(cfg("recbole", tmp_path, "d", on_bad_line="skip"))
    assert [i.item for i in lenient.interactions()] == ["i", "l"]
    assert "line 4: timestamp is 'nan', not a finite number" in lenient.report.examples[1]


# --------------------------------------------------------------------------- csv / parquet


def test_csv_and_parquet_tables(tmp_path):
    import pandas as pd

    write(
        tmp_path / "shop.inter.csv.gz",
        "user_id,item_id,timestamp,rating\nu1,i1,1700000000,5\nu1,i2,2024-01-01T00:00:00Z,\nu2,i1,1700000100.5,1\n",
    )
    write(tmp_path / "shop.item.csv", 'item_id,title,brand,color\ni1,"Mug, large",Acme,red\ni2,Plate &amp; Cup,,\n')
    inter, items = read_all(open_source(cfg("csv", tmp_path, "shop")))
    assert [tuple(i) for i in inter] == [
        ("u1", "i1", 1700000000.0, 5.0),
        ("u1", "i2", 1704067200.0, None),
        ("u2", "i1", 1700000100.5, 1.0),
    ]
    assert items["i1"] == {
        "item": "i1",
        "title": "Mug, large",
        "brand": "Acme",
        "categories": "",
        "description": "",
        "color": "red",
    }
    assert items["i2"]["title"] == "Plate & Cup"
    # Ratings unknown on a row are kept; known ones below min_rating are dropped.
    assert [i.item for i in open_source(cfg("csv", tmp_path, "shop", min_rating=2)).interactions()] == ["i1", "i2"]

    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    pd.DataFrame(
        {"user_id": [1, 1, 2], "item_id": [10, 11, 10], "timestamp": pd.to_datetime([0, 60, 120], unit="s")}
    ).to_parquet(pq_dir / "shop.inter.parquet", row_group_size=2)
    pd.DataFrame({"item_id": [10, 11], "title": ["Ten", None], "categories": [["A", "B"], []]}).to_parquet(
        pq_dir / "shop.item.parquet"
    )
    source = open_source(cfg("csv", pq_dir, "shop"))
    inter, items = read_all(source)
    assert [tuple(i) for i in inter] == [("1", "10", 0.0, None), ("1", "11", 60.0, None), ("2", "10", 120.0, None)]
    assert items["10"]["categories"] == "A, B" and items["11"]["title"] == ""


def test_csv_bad_rows_and_missing_columns(tmp_path):
    inter = write(tmp_path / "s.inter.csv", "user_id,item_id,timestamp\nu1,i1,5\nu1,i2,soon\nu2,,7\nu3,i3\n")
    write(tmp_path / "s.item.csv", "item_id,title\ni1,One\n")
    with pytest.raises(BadInput, match=r"s\.inter\.csv: line 3: timestamp is 'soon': neither a number nor an ISO"):
        list(open_source(cfg("csv", tmp_path, "s")).interactions())
    lenient = open_source(cfg("csv", tmp_path, "s", on_bad_line="skip"))
    assert [i.item for i in lenient.interactions()] == ["i1"]
    assert lenient.report.skipped == {str(inter): 3}
    write(tmp_path / "s.item.csv", "item_id,name\ni1,One\n")
    with pytest.raises(BadInput, match=r"s\.item\.csv: header/schema lacks column\(s\) title"):
        open_source(cfg("csv", tmp_path, "s"))


# --------------------------------------------------------------------------- dispatch and missing files


def test_missing_files_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reviews_Beauty_5\.json, reviews_Beauty_5\.json\.gz, .*in "):
        open_source(cfg("amazon2014", tmp_path, "Beauty"))
    write(tmp_path / "Beauty.txt", S3REC_TXT)
    with pytest.raises(FileNotFoundError, match=r"P5 id maps: expected one of datamaps\.json, datamaps\.json\.gz"):
        open_source(cfg("s3rec", tmp_path, "Beauty"))
    with pytest.raises(FileNotFoundError, match="data.path='/nonexistent' is not a directory"):
        open_source(cfg("lcrec", Path("/nonexistent"), "Beauty"))
    with pytest.raises(ValueError, match="data.name is empty"):
        open_source(cfg("lcrec", tmp_path))
    with pytest.raises(ValueError, match="data.format='amazon' is not a known format: use one of ml-100k"):
        open_source(cfg("amazon", tmp_path, "Beauty"))
    assert set(READERS) == {"ml-100k", "amazon2014", "amazon2018", "amazon2023", "lcrec", "s3rec", "recbole", "csv"}


# --------------------------------------------------------------------------- the real shared data


def counts(interactions) -> tuple[int, int, int]:
    return len({i.user for i in interactions}), len({i.item for i in interactions}), len(interactions)


@pytest.mark.shared_data
def test_shared_beauty_s3rec_equals_lcrec():
    path = shared_data_or_skip("amazon-beauty-2014-5core")
    s3rec = open_source(cfg("s3rec", path, "Beauty"))
    lcrec = open_source(cfg("lcrec", path, "Beauty"))
    s_inter, l_inter = list(s3rec.interactions()), list(lcrec.interactions())
    assert counts(s_inter) == counts(l_inter) == (22_363, 12_101, 198_502)
    # Same sequences: LC-Rec ids are the S3-Rec ids minus one.
    assert all(
        (a.user, a.item, a.timestamp) == (str(int(b.user) + 1), str(int(b.item) + 1), b.timestamp)
        for a, b in zip(s_inter, l_inter)
    )
    # The raw item table (entities escaped, sometimes twice) cleans to the derived LC-Rec table.
    s_items = {m["item"]: m for m in s3rec.items()}
    l_items = {str(int(m["item"]) + 1): m for m in lcrec.items()}
    assert len(s_items) == len(l_items) == 12_101
    for key in ("title", "brand", "categories", "description", "asin"):
        assert [s_items[i][key] for i in s_items] == [l_items[i][key] for i in s_items], key
    assert sum(1 for m in s_items.values() if m["title"]) == 12_094


@pytest.mark.shared_data
def test_shared_scientific_lcrec():
    path = shared_data_or_skip("amazon-industrial-scientific-2018-lcrec")
    source = open_source(cfg("lcrec", path, "Scientific"))
    assert counts(list(source.interactions())) == (8_317, 4_344, 58_492)
    items = list(source.items())
    assert len(items) == 4_344 and all(m["title"] for m in items)
