"""Each benchmark's report, run on a small recorded result (a slice of a real run, in tests/data/bench):
the Markdown table and the plot are written, the plot a real PNG; and `bench report` refuses a folder
without a result or with a broken one, naming it."""

import json
import shutil
from pathlib import Path

import pytest

from tokensieve.cli import main

RECORDED = Path(__file__).parent / "data" / "bench"


@pytest.mark.parametrize("name", ["speed", "spec", "longctx", "cpu"])
def test_report_writes_table_and_plot_from_a_recorded_result(tmp_path, name, capsys):
    shutil.copy(RECORDED / f"{name}.json", tmp_path / f"{name}.json")
    assert main(["bench", "report", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{name}.json").read_text())
    png = (tmp_path / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (tmp_path / f"{name}.md").read_text()
    assert result["command"] in table and result["machine"] in table
    assert table.count("\n|") >= 3  # a header, its rule and at least one row
    assert str(tmp_path / f"{name}.png") in capsys.readouterr().out


def test_speed_report_has_a_row_per_measured_setting(tmp_path):
    shutil.copy(RECORDED / "speed.json", tmp_path / "speed.json")
    main(["bench", "report", str(tmp_path)])
    result = json.loads((tmp_path / "speed.json").read_text())
    table = (tmp_path / "speed.md").read_text()
    for row in result["decode"]:
        assert f"| {row['batch']} | {row['context']} | {row['ours_tok_s']:.1f} |" in table


def test_report_of_a_folder_without_a_result_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "report", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no benchmark result" in capsys.readouterr().err


def test_report_of_broken_json_names_the_file(tmp_path, capsys):
    (tmp_path / "spec.json").write_text('{"summary": ')
    assert main(["bench", "report", str(tmp_path)]) == 2
    assert f"{tmp_path / 'spec.json'} is not valid JSON" in capsys.readouterr().err


def test_report_of_another_kind_of_json_names_what_it_lacks(tmp_path, capsys):
    (tmp_path / "longctx.json").write_text('{"command": "x"}')
    assert main(["bench", "report", str(tmp_path)]) == 2
    assert "is not a result of this tokensieve's bench longctx: it lacks '" in capsys.readouterr().err
