"""Start-up phases: what a load reports, and the one line (and JSON report) a process logs."""

import json
import logging

from checkpoints import checkpoint_path
from rtpllm.engine.startup_phases import REPORT_ENV, StartupPhases
from rtpllm.loader import load_model_and_tokenizer


def test_a_load_reports_its_phases_and_the_tokenizer_thread():
    loaded = load_model_and_tokenizer(checkpoint_path("hd128_sharded"))
    names = [name for name, _ in loaded.phases.phases]
    assert names[:3] == ["config", "model build", "headers"]
    assert names[3].startswith("weights ") and names[3].endswith(" GB")
    assert names[4] == "waiting for the tokenizer"
    assert [name for name, _ in loaded.phases.parallel] == ["tokenizer"]
    assert all(seconds >= 0 for _, seconds in loaded.phases.phases + loaded.phases.parallel)


def test_one_line_carries_details_threads_and_the_other_process(monkeypatch, tmp_path, caplog):
    load = StartupPhases("load")
    load.add("weights 1.00 GB", 0.5)
    load.add_parallel("tokenizer", 1.25, [("imports", 1.0), ("files", 0.25)])
    engine = StartupPhases("engine")
    engine.add("model and tokenizer", 1.5)
    engine.absorb("model and tokenizer", load)
    server = StartupPhases("server")
    server.add("waiting for the engine", 2.0)
    server.add_process(engine.as_dict())
    report = tmp_path / "startup.jsonl"
    monkeypatch.setenv(REPORT_ENV, str(report))
    with caplog.at_level(logging.INFO, logger="rtpllm.startup"):
        server.log()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "rtpllm.startup"]
    assert "waiting for the engine 2.00 s" in line
    assert "| engine start-up" in line
    assert "model and tokenizer 1.50 s (weights 1.00 GB 0.50 s)" in line
    assert "on threads meanwhile: tokenizer 1.25 s (imports 1.00 s, files 0.25 s)" in line
    (written,) = [json.loads(text) for text in report.read_text().splitlines()]
    assert written["who"] == "server"
    assert written["processes"][0]["phases"][0]["parts"] == [{"name": "weights 1.00 GB", "seconds": 0.5}]
    assert written["processes"][0]["parallel"] == [{"name": "tokenizer", "seconds": 1.25, "parts": [
        {"name": "imports", "seconds": 1.0}, {"name": "files", "seconds": 0.25}]}]


def test_an_engine_inside_a_server_logs_at_debug(caplog):
    engine = StartupPhases("engine", level=logging.DEBUG)
    engine.add("model and tokenizer", 1.0)
    with caplog.at_level(logging.INFO, logger="rtpllm.startup"):
        engine.log()
    assert not [r for r in caplog.records if r.name == "rtpllm.startup"]
