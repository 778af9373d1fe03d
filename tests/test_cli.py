"""The ``anatomask`` command line: one-line errors and exit codes, check-data and fingerprint summaries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from anatomask_components import cli
from anatomask_components.data.phantoms import make_phantom
from anatomask_components.data.validation import InvalidScanError
from anatomask_components.data.writers import write_volume


def _case(folder: Path, name: str, seed: int) -> dict[str, str]:
    image, label, affine = make_phantom((16, 16, 12), num_classes=3, seed=seed)
    return {
        "image": str(write_volume(folder / f"{name}.nii.gz", image, affine)),
        "label": str(write_volume(folder / f"{name}_label.nii.gz", label, affine)),
    }


def _truncated(folder: Path, source: str) -> str:
    broken = folder / "truncated.nii.gz"
    broken.write_bytes(Path(source).read_bytes()[:300])
    return str(broken)


@pytest.fixture
def datalists(tmp_path):
    """Datalist files: all good, one truncated scan, one item without an image."""
    a, b, c = (_case(tmp_path, f"case_{i}", seed=i) for i in range(3))
    broken = _truncated(tmp_path, a["image"])
    paths = {}
    for name, content in {
        "good": {"training": [a, b], "validation": [c], "test": []},
        "invalid": {"training": [a, {"image": broken}], "validation": [c], "test": [b]},
        "no_image": {"training": [a, b, {"label": a["label"]}], "validation": [c]},
    }.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(content))
    return paths


def run(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``anatomask *argv`` in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["anatomask", *argv])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("anatomask ")]


def test_check_data_reports_invalid_items_per_section_and_fails(tmp_path, monkeypatch, capsys, datalists):
    cleaned = tmp_path / "cleaned.json"
    code, out, err = run(
        monkeypatch, capsys, "check-data", str(datalists["invalid"]), "--output", str(cleaned)
    )
    assert code == 1
    assert (
        f"[check-data] {datalists['invalid']}: 4 checked, 1 invalid (training: 2 checked, 1 invalid; "
        "validation: 1 checked, 0 invalid; test: 1 checked, 0 invalid)"
    ) in out
    assert "invalid: " in out and "truncated.nii.gz" in out
    assert _error_lines(err) == ["anatomask check-data: error: 1 of 4 items are invalid (listed above)"]
    assert "Traceback" not in err and "skipping invalid item" not in err
    written = json.loads(cleaned.read_text())
    assert [len(written[s]) for s in ("training", "validation", "test")] == [1, 1, 1]


def test_check_data_passes_on_a_clean_datalist(monkeypatch, capsys, datalists):
    code, out, err = run(monkeypatch, capsys, "check-data", str(datalists["good"]))
    assert code == 0
    assert "3 checked, 0 invalid (training: 2 checked, 0 invalid; validation: 1 checked, 0 invalid;" in out
    assert not _error_lines(err)


@pytest.mark.parametrize("command", ["check-data", "fingerprint"])
def test_an_item_without_an_image_is_named_by_section_and_position(monkeypatch, capsys, datalists, command):
    path = datalists["no_image"]
    code, out, err = run(monkeypatch, capsys, command, str(path), "--output", str(path.with_suffix(".out")))
    assert code == 1
    (line,) = _error_lines(err)
    assert line.startswith(f"anatomask {command}: error: {path}: section training item 3 has no 'image' key")
    assert "[check]" not in out and "[fingerprint]" not in out  # found before any scan is read
    assert "Traceback" not in err


def test_fingerprint_stops_at_an_invalid_scan_with_one_line(tmp_path, monkeypatch, capsys, datalists):
    output = tmp_path / "fingerprint.json"
    code, _, err = run(monkeypatch, capsys, "fingerprint", str(datalists["invalid"]), "--output", str(output))
    assert code == 1
    (line,) = _error_lines(err)
    assert line.startswith("anatomask fingerprint: error: ") and "truncated.nii.gz: cannot be read" in line
    assert "Traceback" not in err and not output.exists()


def test_fingerprint_with_on_error_warn_summarises_the_skipped_scans(
    tmp_path, monkeypatch, capsys, datalists
):
    output = tmp_path / "fingerprint.json"
    argv = ["fingerprint", str(datalists["invalid"]), "--output", str(output), "--on_error", "warn"]
    code, out, err = run(monkeypatch, capsys, *argv)
    assert code == 0 and output.exists()
    assert "[fingerprint] 2 case(s) used, 1 invalid case(s) skipped" in out
    assert "  skipped " in out and "truncated.nii.gz" in out
    assert not _error_lines(err) and "skipping invalid item" not in err
    assert json.loads(output.read_text())["num_cases"] == 2


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["check-data", "{tmp}/missing.json"],
            "anatomask check-data: error: {tmp}/missing.json: No such file",
        ),
        (["fingerprint", "{good}", "--on_error", "ignore"], "anatomask fingerprint: error: on_error must be"),
        (["report", "{tmp}/missing.json"], "anatomask report: error: "),
        (
            ["check-data", "{tmp}/not_json.json"],
            "anatomask check-data: error: {tmp}/not_json.json: invalid JSON at line 1 column 2: Expecting "
            "property name enclosed in double quotes",
        ),
    ],
    ids=["missing-file", "bad-option", "report-missing", "not-json"],
)
def test_expected_errors_are_one_line_with_exit_code_1(
    tmp_path, monkeypatch, capsys, datalists, argv, expected
):
    (tmp_path / "not_json.json").write_text("{training: [")
    fill = {"tmp": str(tmp_path), "good": str(datalists["good"])}
    code, _, err = run(monkeypatch, capsys, *[a.format(**fill) for a in argv])
    assert code == 1
    (line,) = _error_lines(err)
    assert line.startswith(expected.format(**fill))
    assert "Traceback" not in err


def test_a_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    from anatomask_components.data import examples

    def offline(cache_dir=None):
        raise RuntimeError("could not download the archive from the package index (offline)")

    monkeypatch.setattr(examples, "fetch_archive", offline)
    code, _, err = run(monkeypatch, capsys, "fetch-examples", str(tmp_path / "examples"))
    assert code == 1
    assert _error_lines(err) == [
        "anatomask fetch-examples: error: could not download the archive from the package index (offline)"
    ]


def test_anatomask_debug_shows_the_traceback(monkeypatch, capsys, datalists):
    monkeypatch.setenv("ANATOMASK_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["anatomask", "fingerprint", str(datalists["invalid"])])
    with pytest.raises(InvalidScanError, match="truncated.nii.gz"):
        cli.main()


def test_unexpected_errors_keep_their_traceback(monkeypatch, capsys):
    def broken(path):
        raise TypeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "report", broken)
    monkeypatch.setattr(sys, "argv", ["anatomask", "report", "x"])
    with pytest.raises(TypeError, match="a bug"):
        cli.main()


def test_commands_called_from_python_still_raise(datalists):
    with pytest.raises(cli.CommandFailed, match="1 of 4 items are invalid"):
        cli.COMMANDS["check-data"](str(datalists["invalid"]))


def test_the_console_script_exits_with_code_1_and_one_line(datalists):
    script = Path(sys.executable).parent / "anatomask"
    if not script.exists():
        pytest.skip("the anatomask console script is not installed next to this Python")
    result = subprocess.run(
        [str(script), "check-data", str(datalists["no_image"])], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert _error_lines(result.stderr) == [
        f"anatomask check-data: error: {datalists['no_image']}: section training item 3 has no 'image' key "
        "(it has ['label'])"
    ]
