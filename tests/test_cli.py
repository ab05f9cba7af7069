"""The alexnet-fast command line: info."""
import os
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


def test_a_bad_default_backend_is_one_clear_error():
    """ALEXNET_FAST_BACKEND is read when first needed: the package still imports, and the command
    says what is wrong in one line."""
    env = {**os.environ, "ALEXNET_FAST_BACKEND": "bogus"}
    res = subprocess.run([sys.executable, "-m", "alexnet_fast.cli", "info"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "alexnet-fast: error: ALEXNET_FAST_BACKEND must be one of ('auto', 'torch', 'native', 'triton'), got 'bogus'")


def test_the_native_extension_is_built():
    """Every native-kernel test skips when alexnet_fast._C cannot be loaded; this one fails
    instead, so that a broken build cannot pass as a row of skips."""
    from alexnet_fast import backends

    ok, reason = backends.availability("native", "cpu")
    assert ok, f"the C++ extension does not load: {reason}"
