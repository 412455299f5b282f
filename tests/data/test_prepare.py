"""`glassbox data prepare`: determinism, no-op reruns, what meta.json records, the split, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from glassbox.cli import main
from glassbox.data.prepare import in_valid_split, prepare
from glassbox.data.store import TokenStore
from glassbox.errors import GlassboxError
from data_helpers import write_corpus

VOCAB = 300


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_same_inputs_give_byte_identical_outputs_and_fingerprint(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    a = prepare([str(corpus)], tmp_path / "a", vocab_size=VOCAB, progress=False)
    b = prepare([str(corpus)], tmp_path / "b", vocab_size=VOCAB, progress=False)
    assert a.fingerprint == b.fingerprint
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    names = {"meta.json", "tokenizer.json", "train.bin", "train.idx", "valid.bin", "valid.idx"}
    assert set(_files(tmp_path / "a")) == names

    (corpus / "doc_03.txt").write_text((corpus / "doc_03.txt").read_text() + "# one more line\n")
    c = prepare([str(corpus)], tmp_path / "c", vocab_size=VOCAB, progress=False)
    assert c.fingerprint != a.fingerprint
    assert c.meta["sources"][0]["sha256"] != a.meta["sources"][0]["sha256"]


def test_second_run_with_unchanged_inputs_is_a_noop_and_changed_inputs_rebuild(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "data"
    first = prepare([str(corpus)], out, vocab_size=VOCAB, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    second = prepare([str(corpus)], out, vocab_size=VOCAB, progress=False)
    assert not first.skipped and second.skipped
    assert second.fingerprint == first.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    third = prepare([str(corpus)], out, vocab_size=VOCAB + 20, progress=False)
    assert not third.skipped and third.fingerprint != first.fingerprint
    assert TokenStore(out).fingerprint == third.fingerprint
    assert not (tmp_path / "data.tmp").exists()


def test_meta_tokenizer_and_store_round_trip_the_documents(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from glassbox.data.store import megatron_datasets

    corpus = write_corpus(tmp_path / "corpus", n_docs=6)
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    result = prepare([str(corpus)], tmp_path / "data", vocab_size=VOCAB, valid_fraction=0.0, progress=False)
    store = TokenStore(tmp_path / "data")
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["fingerprint"] == result.fingerprint == store.fingerprint
    assert meta["vocab_size"] == store.vocab_size == VOCAB and store.eod_id == meta["eod_id"]
    src = meta["sources"][0]
    assert (src["files"], src["documents"], src["bytes"]) == (6, 6, sum(len(t.encode()) for t in texts))
    assert src["tokens"] == meta["splits"]["train"]["tokens"] and meta["splits"]["valid"]["documents"] == 0
    store.verify()

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(store.tokenizer_path))
    indexed = megatron_datasets().indexed_dataset.IndexedDataset(str(store.prefix("train")))
    assert len(indexed) == 6
    for i, text in enumerate(texts):
        ids = np.asarray(indexed[i]).tolist()
        assert ids[-1] == store.eod_id and store.eod_id not in ids[:-1]
        assert hf_tok.decode(ids[:-1]) == text
        assert hf_tok(text)["input_ids"] == ids[:-1]


def test_reusing_a_tokenizer_keeps_it_byte_for_byte(tmp_path, prepared_data):
    corpus = write_corpus(tmp_path / "corpus")
    result = prepare([str(corpus)], tmp_path / "data", tokenizer=prepared_data / "tokenizer.json", progress=False)
    assert (tmp_path / "data" / "tokenizer.json").read_bytes() == (prepared_data / "tokenizer.json").read_bytes()
    assert result.meta["vocab_size"] == TokenStore(prepared_data).vocab_size
    assert result.meta["tokenizer"]["trained"] is False


def test_split_is_by_document_content_and_both_splits_are_filled(tmp_path):
    docs = [f"document number {i}\n" * 5 for i in range(400)]
    chosen = [in_valid_split(d, 0.1) for d in docs]
    assert 20 <= sum(chosen) <= 60
    assert chosen == [in_valid_split(d, 0.1) for d in reversed(docs)][::-1]

    corpus = write_corpus(tmp_path / "corpus", n_docs=3)
    meta = prepare([str(corpus)], tmp_path / "data", vocab_size=VOCAB, valid_fraction=0.01, progress=False).meta
    assert meta["splits"]["train"]["documents"] == 2 and meta["splits"]["valid"]["documents"] == 1


def test_jsonl_parquet_glob_sources_and_undecodable_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": f"json doc {i} " * 30}) for i in range(5)) + "\n")
    pq.write_table(pa.table({"text": [f"parquet row {i} " * 30 for i in range(4)]}), src / "b.parquet")
    (src / "c.txt").write_bytes(b"valid text then bad bytes \xff\xfe here " * 20)
    result = prepare([str(src / "*.jsonl"), str(src / "b.parquet"), str(src / "c.txt")], tmp_path / "data",
                     vocab_size=VOCAB, progress=False)
    docs = [s["documents"] for s in result.meta["sources"]]
    assert docs == [5, 4, 1]
    assert [s["replaced_bytes"] for s in result.meta["sources"]] == [0, 0, 40]
    assert any("40 undecodable bytes" in w and "c.txt" in w for w in result.warnings)


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], dict, str]]:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "rows.csv").write_text("text\nhello\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "notext.jsonl").write_text('{"body": "no text field"}\n')
    good = str(write_corpus(tmp_path / "good", n_docs=2))
    return [
        ([str(tmp_path / "missing.txt")], {}, "missing.txt"),
        ([str(tmp_path / "empty.txt")], {}, "empty.txt"),
        ([str(tmp_path / "nothing-*.txt")], {}, "nothing-*.txt"),
        ([str(tmp_path / "rows.csv")], {}, "unknown source kind"),
        (["ftp://example.org/x.txt"], {}, "unknown source kind"),
        ([str(tmp_path / "broken.jsonl")], {}, "broken.jsonl:2"),
        ([str(tmp_path / "notext.jsonl")], {}, "notext.jsonl:1"),
        ([good], {"vocab_size": 100}, "too small"),
        ([good], {"tokenizer": tmp_path / "no-tokenizer.json"}, "no-tokenizer.json"),
        (["hf:glassbox-test/no-such-dataset"], {}, "hf:glassbox-test/no-such-dataset"),
    ]


def test_each_bad_input_is_one_line_error_naming_it_and_leaves_nothing(tmp_path):
    for sources, kwargs, needle in _bad_inputs(tmp_path):
        out = tmp_path / "out"
        with pytest.raises(GlassboxError) as err:
            prepare(sources, out, **{"vocab_size": VOCAB, "progress": False, **kwargs})
        message = str(err.value)
        assert needle in message and "\n" not in message, message
        assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_refuses_to_replace_a_folder_that_is_not_a_data_dir(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=2)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(GlassboxError, match="refusing to replace"):
        prepare([str(corpus)], out, vocab_size=VOCAB, progress=False)
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_prepare_prints_summary_and_errors_exit_2(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_docs=4)
    out = tmp_path / "data"
    argv = ["data", "prepare", "--source", str(corpus), "--out", str(out), "--vocab-size", str(VOCAB), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert TokenStore(out).fingerprint in printed and "built in" in printed
    assert main(argv) == 0
    assert "unchanged" in capsys.readouterr().out
    assert main(["data", "prepare", "--source", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glassbox: error: source") and "nope.jsonl" in err and "\n" not in err


def test_a_glob_over_a_folder_reads_it_as_the_folder_source_does(tmp_path):
    from glassbox.data.sources import read_source

    corpus = write_corpus(tmp_path / "corpus", n_docs=3)
    folder = read_source(str(corpus))
    for spec in (str(corpus / "*.txt"), str(corpus) + "/**/*.txt"):
        matched = read_source(spec)
        assert matched.documents == folder.documents
        assert matched.sha256 == folder.sha256, spec      # the same names, relative to the folder
    assert read_source(str(corpus / "doc*.txt")).sha256 != read_source(str(tmp_path / "*/doc*.txt")).sha256
