"""The demo's stage server: a forked stage behaves as `python -m monai.bundle run` in a new interpreter."""

from __future__ import annotations

import json
import os

import pytest

from anatomask_components.demo.bundle_process import StageServer, StageServerError, stage_servers_available
from anatomask_components.demo.pipeline import DemoError, run_bundle

pytestmark = pytest.mark.skipif(not stage_servers_available(), reason="the platform cannot fork")

LOGGING = """[loggers]
keys=root
[handlers]
keys=console
[formatters]
keys=plain
[logger_root]
level=INFO
handlers=console
[handler_console]
class=StreamHandler
level=INFO
formatter=plain
args=(sys.stdout,)
[formatter_plain]
format=%(levelname)s - %(message)s
"""


def _bundle(folder, run: list[str]):
    """A bundle whose ``run`` expressions are ``run`` (config ``configs/job.json``)."""
    configs = folder / "configs"
    configs.mkdir(parents=True)
    (configs / "metadata.json").write_text(json.dumps({"version": "0.1.0"}), encoding="utf-8")
    (configs / "logging.conf").write_text(LOGGING, encoding="utf-8")
    imports = ["$import json", "$import os", "$import torch"]
    (configs / "job.json").write_text(json.dumps({"imports": imports, "run": run}), encoding="utf-8")
    (configs / "second.json").write_text(json.dumps({"word": "merged"}), encoding="utf-8")
    return folder


def _report_job():
    """Writes what the process sees (working directory, an environment variable, the merged config key, a
    fresh torch state) into ``report.json`` and prints a line."""
    return [
        "$json.dump({'cwd': os.getcwd(), 'mark': os.environ.get('STAGE_MARK'), 'word': @word, "
        "'grad': torch.is_grad_enabled()}, open('report.json', 'w'))",
        "$print('stage says hello', flush=True)",
        "$torch.set_grad_enabled(False)",
    ]


def test_forked_stage_runs_like_a_fresh_interpreter(tmp_path, monkeypatch):
    folder = _bundle(tmp_path / "bundle", _report_job())
    configs = ["configs/job.json", "configs/second.json"]
    lines = []
    with StageServer(tmp_path / "server.log") as server:
        reports = []
        for mark in ("first", "second"):
            # set after the server started: each stage must see the caller's environment of the moment
            monkeypatch.setenv("STAGE_MARK", mark)
            code, peak = server.run(folder, configs, folder / f"{mark}.log", lines.append)
            assert code == 0 and peak > 0
            reports.append(json.loads((folder / "report.json").read_text(encoding="utf-8")))
    fresh = run_bundle(folder, configs, "fresh", "fresh.log")
    assert fresh.peak_rss_mb > 0
    reports.append(json.loads((folder / "report.json").read_text(encoding="utf-8")))
    # the first stage switched autograd off in its own process only
    expected = {"cwd": str(folder), "word": "merged", "grad": True}
    assert reports[0] == {**expected, "mark": "first"}
    assert reports[1] == {**expected, "mark": "second"}
    assert reports[2] == {**expected, "mark": "second"}
    assert "stage says hello\n" in lines
    for log in ("first.log", "second.log", "fresh.log"):
        assert "stage says hello" in (folder / log).read_text(encoding="utf-8")


def test_a_failing_stage_names_its_log_and_the_server_goes_on(tmp_path):
    good = _bundle(tmp_path / "good", _report_job())
    bad = _bundle(tmp_path / "bad", ["$1 / 0"])
    with StageServer(tmp_path / "server.log") as server:
        with pytest.raises(DemoError, match=r"bad failed \(exit code 1\); full log: .*bad\.log") as error:
            run_bundle(bad, ["configs/job.json"], "bad", "bad.log", server)
        assert "ZeroDivisionError" in str(error.value)
        assert "ZeroDivisionError" in (bad / "bad.log").read_text(encoding="utf-8")
        assert run_bundle(good, ["configs/job.json", "configs/second.json"], "good", "good.log", server)


def test_a_dead_server_is_reported_with_its_log(tmp_path):
    folder = _bundle(tmp_path / "bundle", _report_job())
    with StageServer(tmp_path / "server.log") as server:
        server._process.kill()
        server._process.wait()
        with pytest.raises(StageServerError, match=r"stage server exited .*server\.log"):
            server.run(folder, ["configs/job.json"], folder / "job.log", print)
    with pytest.raises(StageServerError, match="not started"):
        StageServer(tmp_path / "other.log").run(folder, ["configs/job.json"], folder / "job.log", print)
    assert os.path.exists(tmp_path / "server.log")
