"""The alexnet-fast command line: info."""
import subprocess
import sys

from alexnet_fast import cli
from alexnet_fast.info import info


def test_info_reports_backends_and_auto_choice():
    d = info()
    assert d["torch"] and "cpu" in d["backends"] and "cpu" in d["auto"]
    for name in ("torch", "native", "triton"):
        status = d["backends"]["cpu"][name]
        assert status == "usable" or status.startswith("unavailable: ")
    layers = {f"conv2d_relu conv{i}" for i in range(1, 6)}
    assert set(d["auto"]["cpu"]) == {"conv2d_relu", "lrn", "max_pool2d", "lrn_max_pool2d"} | layers
    assert all(v == "torch" for k, v in d["auto"]["cpu"].items() if k.startswith("conv2d_relu"))


def test_info_command(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "native:" in out and "auto:" in out


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "alexnet_fast.cli", "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch:" in res.stdout
