from __future__ import annotations

import pytest
from click.testing import CliRunner

from autotransfer.cli import main
from autotransfer.testing import FAIL, PASS, SKIP, check_backbone, run_checks

pytestmark = pytest.mark.filterwarnings("ignore:Overwriting leaky_tinynet")


def test_a_good_plugin_backbone_passes_every_check(plugin_site):
    results = {check.name: check for check in check_backbone("leaky_tinynet")}
    assert [name for name, check in results.items() if check.status == PASS] == [
        "listed", "builds", "weights", "depths", "frozen fit", "predict/evaluate", "load_model (fresh process)"]
    assert results["preprocessing"].status == SKIP  # random-ish weights, no ImageNet head
    assert "tiny-leaky-set" in results["preprocessing"].reason


def test_a_misspelt_architecture_fails_with_the_reason(plugin_site):
    with pytest.raises(AssertionError, match=r"FAIL listed: .*'leaky_tinynett' is not a timm model"):
        check_backbone("a_misspelt_net")


def test_weights_that_cannot_load_fail_and_the_rest_still_runs(plugin_site):
    results = {check.name: check for check in run_checks("a_gone_weights_net")}
    assert results["weights"].status == FAIL and "gone.pth" in results["weights"].reason
    assert results["frozen fit"].status == PASS and "random weights" in results["frozen fit"].reason


def test_cli_prints_one_line_per_check_and_exits_1_on_a_failure(plugin_site):
    result = CliRunner().invoke(main, ["check-plugin", "a_misspelt_net"])
    assert result.exit_code == 1
    assert result.output.splitlines()[0].startswith("FAIL listed: backbone 'a_misspelt_net' of plugin autotransfer-bad-specs")
    assert "a_misspelt_net: 1 check(s) failed" in result.output
