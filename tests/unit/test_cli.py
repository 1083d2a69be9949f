"""The README's main job (python -m gradcomp demo) end to end, small."""

import json

import pytest

from gradcomp.__main__ import main


def test_demo_reports_fit_split_error_and_bits(capsys):
    assert main(["demo", "--numel", "50000", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert abs(r["fit"]["sigma"] - 2.0) < 0.05 and abs(r["fit"]["mu"] + 9.0) < 0.05
    assert r["ks"]["lognormal"][0] < r["ks"]["normal"][0]
    assert r["chosen"]["format"].startswith("float6_")
    for q in r["quantized"].values():
        assert abs(q["measured_relative_error"] - q["predicted_relative_error"]) < 0.05 * q["predicted_relative_error"]
        assert 6.0 <= q["bits_per_element"] <= 6.01
    assert abs(r["pruning"]["measured_sparsity"] - 0.85) < 0.01


@pytest.mark.parametrize("args", [["demo", "--bits", "1"], ["demo", "--sigma", "-1"],
                                  ["demo", "--sparsity", "1.5"], ["demo", "--numel", "1"], ["nope"]])
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
