"""The `jfp8` command line: dispatch, the demo tables and the KV memory calculator."""
import re

import pytest

from jfp8 import cli
from jfp8.demo import error_table, formats_table


def test_help_and_unknown_command(capsys):
    assert cli.main([]) == 0
    assert "commands: demo, memory" in capsys.readouterr().out
    assert cli.main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_formats_table_is_computed():
    table = formats_table()
    assert "| E4M3 | 1 | 4 | 3 | 7 | 448 |" in table
    assert "| E5M2 | 1 | 5 | 2 | 15 | 57344 |" in table
    assert "| BF16 | 1 | 8 | 7 | 127 |" in table


def test_error_table_shows_outliers_hurt_per_tensor_most():
    table = error_table()
    row = next(line for line in table.splitlines() if line.startswith("| acts, outliers x1e5 | E4M3"))
    errors = [float(v) for v in re.findall(r"([\d.]+)% \(", row)]
    per_tensor, per_channel, block128, block32 = errors
    assert per_tensor > block128 > block32  # smaller blocks confine the outliers' damage
    gaussian = next(line for line in table.splitlines() if line.startswith("| gaussian W | E4M3"))
    for v in re.findall(r"([\d.]+)% \(", gaussian):
        assert 1.5 < float(v) < 3.0  # the E4M3 mantissa floor, ~2.2%, whatever the granularity


def test_memory_calculator_doubles_kv_capacity(capsys):
    assert cli.main(["memory", "--model", "llama3.1-8b", "--gb", "70", "--context", "32768"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| bf16") or line.startswith("| fp8")]
    tokens_per_gb = [int(r.split("|")[5]) for r in rows]
    assert tokens_per_gb[0] == 7629  # 32 layers × 2 × 8 heads × 128 × 2 bytes = 131072 B/token
    assert tokens_per_gb[2] == 2 * tokens_per_gb[0]  # FP8 per-tensor: exactly half the bytes
    with pytest.raises(SystemExit):
        cli.main(["memory", "--model", "gpt-5"])
