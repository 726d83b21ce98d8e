"""Every kind of bad input gets one clear message naming file, line and key; exit 2; no traceback;
nothing is run and no MLflow run is created."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from sparselab.cli import main

from conftest import write

GOOD = """name: bad
model: tiny-llama
data_dir: builtin
defaults:
  prune: {method: magnitude, sparsity: 0.5}
  recover: {method: none}
  evaluate: {perplexity: {data: wikitext2, seqlen: 64}, tasks: []}
experiments:
  a: {prune.sparsity: 0.5}
  b: {prune.sparsity: 0.6}
"""

CASES = {
    "yaml syntax": (GOOD.replace("tasks: []}", "tasks: [}"), ["YAML syntax error", "line 7"]),
    "unknown key": (GOOD.replace("sparsity: 0.5}", "sparsty: 0.5}", 1),
                    ["unknown key 'sparsty'", "Did you mean 'sparsity'", "prune.sparsty", "line 5"]),
    "unknown key in experiment": (GOOD.replace("a: {prune.sparsity: 0.5}", "a: {prune.sparsity: 0.5, prune.metod: x}"),
                                  ["unknown key 'metod'", "Did you mean 'method'", "line 9"]),
    "wrong type": (GOOD.replace("b: {prune.sparsity: 0.6}", "b: {prune.sparsity: lots}"),
                   ["prune.sparsity", "valid number", "line 10"]),
    "sparsity out of range": (GOOD.replace("b: {prune.sparsity: 0.6}", "b: {prune.sparsity: 1.0}"),
                              ["prune.sparsity", "less than 1", "cell 'b'", "line 10"]),
    "unknown method": (GOOD.replace("method: magnitude", "method: magnitud"),
                       ["unknown pruning method 'magnitud'", "Did you mean 'magnitude'"]),
    "unknown dataset": (GOOD.replace("data: wikitext2", "data: wikitext3"),
                        ["unknown dataset 'wikitext3'", "Did you mean 'wikitext2'"]),
    "unknown model": (GOOD.replace("model: tiny-llama", "model: tiny-lama"),
                      ["unknown model 'tiny-lama'", "Did you mean 'tiny-llama'"]),
    "offline hub model": (GOOD.replace("model: tiny-llama", "model: nobody/no-such-model"),
                          ["hub is offline", "nobody/no-such-model"]),
    "duplicate experiment": (GOOD + "  a: {prune.sparsity: 0.7}\n", ["duplicate key 'a'", "line 11"]),
    "python tag": (GOOD.replace("name: bad", "name: !!python/object/apply:os.system ['true']"),
                   ["YAML tag not allowed", "line 1"]),
    "missing data dir": (GOOD.replace("data_dir: builtin", "data_dir: /no/such/folder"),
                         ["data directory '/no/such/folder' does not exist", "data_dir"]),
    "unknown pattern": (GOOD.replace("sparsity: 0.5}", "sparsity: 0.5, pattern: '4:2'}", 1),
                        ["N:M pattern '4:2' needs 0 < N < M"]),
    "sparsity against N:M": (GOOD.replace("b: {prune.sparsity: 0.6}",
                                          "b: {prune.sparsity: 0.7, prune.pattern: '2:4'}"),
                             ["pattern '2:4' keeps 2 of every 4 weights (sparsity 0.5)",
                              "prune.sparsity is 0.7", "N:M counts the weights kept", "line 10"]),
    "sparsity against tiers": (GOOD.replace("method: magnitude, sparsity: 0.5}",
                                            "method: wanda, sparsity: 0.5, pattern: tiers}"),
                               ["options.tiers.ratios [0.35, 0.45, 0.2]", "prunes 0.425",
                                "prune.sparsity is 0.5", "[0.25, 0.5, 0.25]", "cell 'a'", "line 9"]),
    "empty grid": (GOOD + "grid:\n  prune.sparsity: []\n", ["grid key 'prune.sparsity' has no values"]),
    "not a mapping": ("- a\n- b\n", ["must be a YAML mapping"]),
    "better without a better side": (GOOD + "expect:\n  a: {sparsity.linear: better}\n",
                                     ["sparsity.linear has no better or worse side", "expect"]),
    "bad margin": (GOOD + "report: {margin: {boolq.acc: lots}}\n",
                   ["margin of 'boolq.acc' is 'lots'", "'5%'", "report"]),
    "bad alpha": (GOOD + "report: {alpha: 1.5}\n", ["report.alpha", "less than 1"]),
    "seed out of range": (GOOD.replace("data_dir: builtin", "data_dir: builtin\nseed: 4294967296"),
                          ["key 'seed'", "less than or equal to 4294967295", "line 4"]),
    "infinite lr": (GOOD.replace("b: {prune.sparsity: 0.6}", "b: {recover.train.lr: .inf}"),
                    ["recover.train.lr", "finite number", "line 10"]),
    "negative mix weight": (GOOD.replace("b: {prune.sparsity: 0.6}",
                                         "b: {prune.calibration.data: {mix: {wikitext2: -1}}}"),
                            ["prune.calibration.data.mix.wikitext2", "greater than 0"]),
    "expect names no experiment": (GOOD + "expect:\n  c: {wikitext2.ppl: down}\n",
                                   ["expect: 'c' is not an experiment", "Experiments: a, b",
                                    "line 12"]),
    "unknown report baseline": (GOOD + "report: {baseline: bb}\n",
                                ["report.baseline 'bb' is not an experiment", "Did you mean 'b'",
                                 "line 11"]),
    "unknown method option": (GOOD.replace("sparsity: 0.5}", "sparsity: 0.5, options: {tier: {}}}", 1),
                              ["unknown key 'tier'", "Did you mean 'tiers'", "prune.options.tier",
                               "line 5"]),
    "bad nested option": (GOOD.replace("sparsity: 0.5}", "sparsity: 0.5, options: {tiers: "
                                       "{ratios: [0.5, 0.5, 0.5]}}}", 1),
                          ["prune.options.tiers.ratios", "sum to 1", "line 5"]),
    "option of another method": (GOOD.replace("b: {prune.sparsity: 0.6}",
                                              "b: {prune.options.blocksize: 64}"),
                                 ["unknown key 'blocksize'", "prune.options.blocksize", "line 10",
                                  "Valid keys here: tiers"]),
    "alias bomb": (GOOD.replace("method: magnitude, sparsity: 0.5}", "method: magnitude, "
                                "sparsity: 0.5, options: {" + ", ".join(
                                    [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "0"] * 10)
                                     + "]" for i in range(9)]) + "}}"),
                   ["expands to more than 100,000 YAML nodes", "--max-nodes"]),
    "huge grid": (GOOD + "grid:\n" + "".join(f"  prune.calibration.{k}: {list(range(1, 101))}\n"
                                              for k in ("samples", "seqlen")),
                  ["expands to 20,000 cells", "limit of 1,000", "--max-cells", "line 11"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_matrix_is_refused_clearly(workspace, case):
    text, expected = CASES[case]
    path = write(workspace / "bad.yaml", text)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "bad.yaml" in message
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert "Traceback" not in result.output
    assert not (workspace / "mlflow.db").exists()  # no run was created
    assert not (workspace / "home").exists()  # no stage was computed


def test_non_utf8_matrix(workspace):
    path = workspace / "bad.yaml"
    path.write_bytes(GOOD.replace("name: bad", "name: bad\ndescription: caf\xe9").encode("latin-1"))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "bad.yaml, line 2" in result.output and "not UTF-8" in result.output


def test_limits_can_be_raised_and_set_errors_name_the_flag(workspace):
    path = write(workspace / "m.yaml", GOOD)
    result = CliRunner().invoke(main, ["validate", str(path), "--max-cells", "1"])
    assert result.exit_code == 2 and "expands to 2 cells" in result.output
    assert CliRunner().invoke(main, ["validate", str(path), "--max-cells", "2"]).exit_code == 0
    # a bad --set value is blamed on the flag, not on the experiment line that sets the same key
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "prune.sparsity=1.5"])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "--set prune.sparsity=1.5" in message
    assert "line" not in message


def test_missing_data_file(workspace):
    data = workspace / "data"
    write(data / "wikitext-2" / "wiki.valid.tokens", "some text\n")
    path = write(workspace / "bad.yaml", GOOD.replace("data_dir: builtin", f"data_dir: {data}"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "split 'test' not found" in message and "wiki.test.raw" in message
    assert "evaluate.perplexity.data" in message


def test_missing_matrix_file(workspace):
    result = CliRunner().invoke(main, ["plan", "nope.yaml"])
    assert result.exit_code == 2 and "matrix file not found" in result.output


def test_bad_set_and_only(workspace):
    path = write(workspace / "m.yaml", GOOD)
    result = CliRunner().invoke(main, ["plan", str(path), "--set", "prune.sparsity"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = CliRunner().invoke(main, ["plan", str(path), "--only", "c"])
    assert result.exit_code == 2 and "unknown cell 'c'" in result.output


def test_ray_options_need_the_ray_executor(workspace):
    path = write(workspace / "m.yaml", GOOD)
    result = CliRunner().invoke(main, ["run", str(path), "--max-concurrent", "2",
                                       "--address", "auto"])
    assert result.exit_code == 2
    assert "--address, --max-concurrent: only with --executor ray" in result.output
    assert not (workspace / "mlflow.db").exists()  # refused before any run was created


def test_validate_reports_every_bad_file(workspace):
    good = write(workspace / "good.yaml", GOOD)
    first = write(workspace / "first.yaml", GOOD.replace("a: {prune.sparsity: 0.5}",
                                                          "a: {prune.sparsity: 1.5}"))
    second = write(workspace / "second.yaml", GOOD.replace("name: bad", "name: bad\nnope: 1"))
    result = CliRunner().invoke(main, ["validate", str(first), str(good), str(second)])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in message
    assert "first.yaml" in message and "second.yaml" in message and "nope" in message
    assert "ok " + str(good) in message and "2 of 3 matrix files are not valid" in message
