"""``nnunet_ssp/provenance.py``: the provenance record's fields against the machine and the checkout, the phase-time
file (round trip, appending, a malformed file, where the report finds it) and the protocol's records of its phases
(with its runs replaced by a trivial command; the report's header and ``nnunet_ssp results``: test_report.py)."""

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timedelta
from importlib import metadata

import pytest
import torch

from nnunet_ssp import protocol
from nnunet_ssp.errors import SSPError
from nnunet_ssp.experiments import PaperExperiment
from nnunet_ssp.provenance import (
    LIBRARIES,
    PHASE_TIMES_FILE,
    collect_provenance,
    find_phase_times,
    load_provenance,
    read_phase_times,
    record_phase,
    render_provenance_markdown,
    utc_now,
)
from nnunet_ssp.runner import Command, Run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def test_provenance_fields_are_those_of_this_checkout_and_machine(tmp_path):
    argv = ["nnunet_ssp", "report", str(tmp_path / "my results"), "-o", "out"]
    before = utc_now().replace(microsecond=0)
    provenance = collect_provenance(argv, [str(tmp_path)])
    assert shlex.split(provenance["command"]) == argv and provenance["working_directory"] == os.getcwd()
    assert provenance["commit"] == _git("rev-parse", "HEAD") and provenance["repository"] == REPO
    assert provenance["dirty"] == bool(_git("status", "--porcelain", "--untracked-files=no"))
    assert before <= datetime.fromisoformat(provenance["date"]) <= utc_now()
    hardware = provenance["hardware"]
    assert hardware["logical_cores"] == os.cpu_count() and hardware["usable_cores"] == len(os.sched_getaffinity(0))
    assert hardware["memory_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert hardware["gpus"] == (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    with open("/proc/cpuinfo") as f:
        assert f"model name\t: {hardware['cpu']}\n" in f.read()
    assert provenance["versions"] == {
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in LIBRARIES},
    }
    assert provenance["phase_times"] == []
    saved = tmp_path / "provenance.json"
    saved.write_text(json.dumps(provenance))
    assert load_provenance(str(saved)) == provenance
    text = render_provenance_markdown(provenance)
    assert f"- Command: `{provenance['command']}` (in {os.getcwd()})" in text
    assert f"- Commit: {provenance['commit']} (" in text and f"- Date: {provenance['date']}" in text
    assert f"; {os.cpu_count()} logical cores, " in text and "torch " + metadata.version("torch") in text
    assert "- Wall time per phase: not recorded" in text


def test_a_provenance_outside_a_git_checkout_says_unknown(monkeypatch):
    from nnunet_ssp import provenance

    monkeypatch.setattr(provenance, "_git", lambda folder, *args: None)
    record = collect_provenance(["nnunet_ssp", "report"])
    assert (record["commit"], record["dirty"], record["repository"]) == ("unknown", None, None)
    assert "- Commit: unknown (nnunet_ssp is not installed from a git checkout)" in render_provenance_markdown(record)


def test_a_malformed_provenance_is_one_error_naming_it(tmp_path):
    path = tmp_path / "provenance.json"
    record = collect_provenance(["nnunet_ssp", "report"])
    del record["hardware"]["gpus"]
    path.write_text(json.dumps(record))
    with pytest.raises(SSPError, match=f"^{path}: not a provenance record \\(no hardware.gpus\\)$"):
        load_provenance(str(path))


def test_phase_times_round_trip_and_a_rerun_appends(tmp_path):
    start = utc_now() - timedelta(seconds=90)
    path = record_phase(str(tmp_path / "out"), "prepare", start)
    assert path == str(tmp_path / "out" / PHASE_TIMES_FILE)
    first = read_phase_times(path)
    assert len(first) == 1 and first[0]["phase"] == "prepare" and first[0]["shard"] is None
    assert first[0]["start"] == start.isoformat(timespec="seconds")
    assert first[0]["seconds"] == pytest.approx(
        (datetime.fromisoformat(first[0]["end"]) - start).total_seconds(), abs=1
    )
    record_phase(str(tmp_path / "out"), "pretrain", utc_now(), "1/3")
    assert read_phase_times(path)[0] == first[0]
    assert [(r["phase"], r["shard"]) for r in read_phase_times(path)] == [("prepare", None), ("pretrain", "1/3")]
    assert sorted(os.listdir(tmp_path / "out")) == [f".{PHASE_TIMES_FILE}.lock", PHASE_TIMES_FILE]

    with open(path) as f:
        content = json.load(f)
    del content["phases"][1]["seconds"]
    with open(path, "w") as f:
        json.dump(content, f)
    with pytest.raises(SSPError, match=f"^{path}: phase record 1 is not "):
        record_phase(str(tmp_path / "out"), "finetune", utc_now())


def test_the_report_finds_the_nearest_phase_times_in_or_above_each_results_folder(tmp_path):
    outer, inner = tmp_path / "outer", tmp_path / "outer" / "protocol"
    for folder in (outer, inner):
        record_phase(str(folder), "report", utc_now())
    deep = inner / "predictions" / "trainer" / "fold_0"
    deep.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    found = find_phase_times([str(deep), str(inner), str(outer / "protocol" / "predictions"), str(outer)])
    assert found == [str(inner / PHASE_TIMES_FILE), str(outer / PHASE_TIMES_FILE)]
    assert find_phase_times([str(tmp_path / "elsewhere")]) == []


def test_the_protocol_records_each_phase_it_ran_and_a_rerun_adds_its_own(tmp_path, monkeypatch):
    """The protocol's phase loop with each phase one trivial run: a record per phase after the phase, appended by a
    re-run, the shard when sharded; a dry run records nothing."""
    output = tmp_path / "protocol"

    class OneCommandProtocol:
        dataset_name, output, experiment = "Dataset000_Fake", str(tmp_path / "protocol"), PaperExperiment()

        def __init__(self, args):
            pass

        def phase_runs(self, phase, shard):
            return [[Run(phase, f"{phase} step", [Command([sys.executable, "-c", ""], lambda: False)])]]

    monkeypatch.setattr(protocol, "Protocol", OneCommandProtocol)

    def phases():
        return [(r["phase"], r["shard"]) for r in read_phase_times(str(output / PHASE_TIMES_FILE))]

    assert protocol.main(["-d", "1", "--phase", "prepare"]) == 0
    assert phases() == [("prepare", None)]
    assert protocol.main(["-d", "1", "--phase", "pretrain", "--dry-run"]) == 0
    assert protocol.main(["-d", "1", "--phase", "pretrain", "--shard", "1/2"]) == 0
    assert protocol.main(["-d", "1"]) == 0
    assert phases() == [
        ("prepare", None),
        ("pretrain", "1/2"),
        ("prepare", None),
        ("pretrain", None),
        ("finetune", None),
        ("report", None),
    ]
    assert all(r["seconds"] >= 0 for r in read_phase_times(str(output / PHASE_TIMES_FILE)))
