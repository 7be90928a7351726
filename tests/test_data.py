
import pytest

from ehi.data import DataError, load_beir, load_corpus, load_qrels


def test_beir_loading_with_graded_qrels(tiny_beir):
    ds = load_beir(tiny_beir)
    assert len(ds.corpus) == 60
    assert ds.corpus.documents()[0].startswith("astronomy ")
    qrels = ds.split("train")
    assert set(qrels["q-astronomy-1"].values()) == {2}
    assert set(qrels["q-astronomy-2"].values()) == {1}
    assert len(ds.relevant("test")) == 12


def test_scores_of_zero_or_less_are_not_relevant(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": "y"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n{"_id": "q2", "text": "y"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t0\nq1\td2\t3\nq2\td1\t-1\n")
    ds = load_beir(tmp_path)
    assert ds.split("test")["q1"] == {"d1": 0, "d2": 3}
    assert ds.relevant("test") == {"q1": ["d2"]}


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"_id": "a", "text": "x"}\n{not json}\n', ":2: invalid JSON"),
        ('{"_id": "a"}\n', ":1: missing field 'text'"),
        ('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n', ":2: duplicate _id 'a'"),
        ("", "corpus is empty"),
    ],
)
def test_corpus_errors_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "corpus.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        load_corpus(p)
    assert str(p) in str(e.value)


def test_non_utf8_is_reported_with_line(tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_bytes(b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "\xff"}\n')
    with pytest.raises(DataError, match=":2: not valid UTF-8"):
        load_corpus(p)


@pytest.mark.parametrize(
    "content,message",
    [
        ("qid\tdid\tscore\n", ":1: expected header"),
        ("query-id\tcorpus-id\tscore\nq1\td1\n", ":2: expected 3 tab-separated columns"),
        ("query-id\tcorpus-id\tscore\nq1\td1\thigh\n", ":2: score 'high' is not an integer"),
    ],
)
def test_qrels_errors(tmp_path, content, message):
    p = tmp_path / "test.tsv"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        load_qrels(p)


def test_missing_dataset_name_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_beir(tmp_path / "nope" / "x")


@pytest.mark.parametrize("line,fragment", [
    ('{"_id": null, "text": "x"}', "_id must be"),
    ('{"_id": "", "text": "x"}', "_id must be"),
    ('{"_id": ["a"], "text": "x"}', "_id must be"),
    ('{"_id": true, "text": "x"}', "_id must be"),
    ('{"_id": "a", "text": {"nested": 1}}', "field 'text' must be a string"),
    ('{"_id": "a", "title": 3, "text": "x"}', "field 'title' must be a string"),
])
def test_ids_and_texts_of_the_wrong_type_are_refused_with_file_and_line(tmp_path, line, fragment):
    from ehi.data import DataError, load_corpus

    f = tmp_path / "corpus.jsonl"
    f.write_text('{"_id": "ok", "text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"corpus.jsonl:2: {fragment}"):
        load_corpus(f)


def test_a_byte_order_mark_is_accepted(tmp_path):
    from ehi.data import load_corpus

    f = tmp_path / "corpus.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"_id": "a", "text": "x"}\n{"_id": 7, "text": "y"}\n')
    assert load_corpus(f).ids == ["a", "7"]
