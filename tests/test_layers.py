"""The layering written down in pyproject.toml holds on the tree as it is: import-linter, as
`make lint` runs it, finds every contract kept and no exception listed."""

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_import_linter_contract_is_kept_without_exceptions():
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert contracts, "pyproject.toml has no import-linter contract"
    # A layer with known exceptions is a layer with holes: remove the import, not the rule.
    assert not [contract["name"] for contract in contracts if contract.get("ignore_imports")]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache", "--no-logo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(contracts)} kept, 0 broken." in result.stdout, result.stdout
