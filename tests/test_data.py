"""The data catalog: local files give the very rows (and so the very text) the hub gives."""
from __future__ import annotations

from sparselab.data.catalog import resolve_data_dir
from sparselab.matrix import Mixture
from sparselab.registry import DATASETS
from sparselab.stages import _data_key

# A raw WikiText-2 file: blank lines are " ", a CRLF line, a form feed and a line separator
# inside lines (str.splitlines would cut there, a file's lines do not), no newline at the end.
RAW = (" \n = Title = \n \n Some text , with \x0c a form feed . \n"
       " A line \u2028 separator and a CRLF end . \r\n \n The last line")
# The rows the hub's `wikitext` builder yields for that file: each line as the file iterates in
# text mode, "\n" kept; a line of only whitespace becomes "".
HUB_ROWS = ["", " = Title = \n", "", " Some text , with \x0c a form feed . \n",
            " A line \u2028 separator and a CRLF end . \n", "", " The last line"]


def test_local_wikitext2_rows_are_the_hubs(tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_bytes(RAW.encode("utf-8"))
    wikitext2 = DATASETS.get("wikitext2")()
    source = resolve_data_dir(str(tmp_path))
    assert [r["text"] for r in wikitext2.records(source, "test")] == HUB_ROWS
    # the papers' perplexity text and the reference calibration text follow token for token
    assert wikitext2.text(source, "test") == "\n\n".join(HUB_ROWS)
    assert wikitext2.text(source, "test", " ") == " ".join(HUB_ROWS)


def test_a_revised_dataset_changes_only_the_keys_of_stages_that_read_it():
    source = resolve_data_dir("builtin")
    assert DATASETS.get("wikitext2").revision > 1 and DATASETS.get("squad").revision == 1
    assert _data_key(source, ["squad"]) == "builtin"  # entries made before the revision still hit
    revised = f"wikitext2@{DATASETS.get('wikitext2').revision}"
    assert _data_key(source, ["wikitext2"]) == f"builtin {revised}"
    assert _data_key(source, ["gsm8k", Mixture(mix={"squad": 1, "wikitext2": 1})]) == f"builtin {revised}"
