"""What a cluster job's log and a run's records show (README "Logs"): the run folder first, a timestamped progress
line for every long phase in a non-TTY log, one global step in metrics.jsonl and TensorBoard (also after --resume),
the resolved config in TensorBoard, and wandb with --track (offline here)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import opsr  # noqa: E402
import osp  # noqa: E402
import sera  # noqa: E402
import srdpo  # noqa: E402

MODULES = {"sera": sera, "srdpo": srdpo, "opsr": opsr, "osp": osp}
TINY = ["--iterations", "2", "--num_pairs", "32", "--num_eval", "8", "--n_cand", "2"]
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def run(out: Path, *extra, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [sys.executable, str(ROOT / "sera.py"), *TINY, "--output_dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent)  # pipes: not a terminal


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_steps(out: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A tiny SeRA run in a non-TTY log, with a progress line on every update (SELFPO_LOG_INTERVAL=0)."""
    out = tmp_path_factory.mktemp("logs") / "run"
    res = run(out, env={"SELFPO_LOG_INTERVAL": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_the_run_folder_comes_first_and_is_recorded(logged_run):
    out, res = logged_run
    first = res.stdout.splitlines()[0]
    assert STAMP.match(first) and first[20:].startswith(f"run folder: {out}")
    assert all(STAMP.match(line) for line in res.stdout.splitlines())  # every line of the log timestamped
    assert json.loads((out / "resolved_config.json").read_text())["output_dir"] == str(out)


def test_every_long_phase_logs_timestamped_lines_with_elapsed_time_and_eta(logged_run):
    _, res = logged_run
    lines = res.stderr.splitlines()
    bars = [line for line in lines if "%|" in line]
    assert bars and all(STAMP.match(line) for line in bars), bars[:3]
    for phase in ("score D under theta_0", "score D under theta_1", "bootstrap samples", "eval", "iteration 2"):
        mine = [line for line in bars if line[20:].startswith(f"{phase}:")]
        assert len(mine) >= 2, f"{phase}: {mine}"  # its start and its end at least
        assert "100%" in mine[-1] and re.search(r"\[\d\d:\d\d<\d\d:\d\d", mine[-1])  # elapsed < remaining
    assert all(a[20:] != b[20:] for a, b in zip(bars, bars[1:]))  # no line repeated
    assert not any("\r" in line for line in lines)


def test_every_checkpoint_write_says_what_it_wrote_and_how_long_it_took(logged_run):
    out, res = logged_run
    written = [line[20:] for line in res.stdout.splitlines() if line[20:].startswith("wrote ")]
    for folder in ("iter_1", "iter_2"):
        assert any(re.fullmatch(rf"wrote {out / folder} \(\d+\.\d (MiB|GiB)\) in \d+\.\d s", w) for w in written), (
            written
        )


def test_a_long_checkpoint_write_gives_a_line_every_interval(tmp_path, monkeypatch, capsys):
    """A write that takes 2.5 s with SELFPO_LOG_INTERVAL=1: lines with what .tmp holds so far, then the total."""
    import time

    monkeypatch.setenv("SELFPO_LOG_INTERVAL", "1")

    def slow(folder):
        (folder / "weights.bin").write_bytes(bytes(3 << 20))
        time.sleep(2.5)

    sera.write_folder(tmp_path / "checkpoint", slow)
    lines = capsys.readouterr().out.splitlines()
    beats = [line for line in lines if line.startswith(f"writing {tmp_path / 'checkpoint'}: 3.0 MiB so far, ")]
    assert len(beats) >= 2, lines
    assert re.fullmatch(rf"wrote {tmp_path / 'checkpoint'} \(3\.0 MiB\) in 2\.\d s", lines[-1]), lines


def test_one_global_step_in_metrics_and_tensorboard(logged_run):
    out, _ = logged_run
    steps = [r for r in records(out) if "step" in r]
    assert [r["iteration"] for r in steps] == sorted(r["iteration"] for r in steps)
    assert [r["global_step"] for r in steps] == list(range(1, len(steps) + 1))  # counts on across iterations
    assert steps[-1]["step"] < steps[-1]["global_step"]  # while `step` restarts each iteration
    assert tensorboard_steps(out, "loss") == [r["global_step"] for r in steps]
    evaluation = [r for r in records(out) if "eval/reward" in r]
    first_of = {t: min(r["global_step"] for r in steps if r["iteration"] == t) for t in (1, 2)}
    assert [r["global_step"] for r in evaluation] == [0, first_of[2] - 1, steps[-1]["global_step"]]


def test_the_resolved_config_is_in_tensorboard(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = logged_run
    events = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n").removeprefix("json")) == json.loads((out / "resolved_config.json").read_text())


def test_a_resumed_run_numbers_its_steps_as_the_uninterrupted_one(logged_run, tmp_path):
    out, _ = logged_run
    stopped = tmp_path / "stopped"
    res = run(stopped, "--stop_after_steps", "3")  # in iteration 2, whose step 1 the resumed run redoes
    assert res.returncode == 130, res.stderr[-2000:]
    res = run(stopped, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    expected = [(r["iteration"], r["step"], r["global_step"]) for r in records(out) if "step" in r]
    assert [(r["iteration"], r["step"], r["global_step"]) for r in records(stopped) if "step" in r] == expected
    assert sorted(set(tensorboard_steps(stopped, "loss"))) == [g for _, _, g in expected]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed ([wandb] extra)")
def test_track_logs_the_config_and_syncs_tensorboard_to_wandb_offline(tmp_path):
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_PROJECT": "from-env", "WANDB_SILENT": "true"}
    res = run(out, "--iterations", "1", "--track", "--wandb_entity", "lab", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    data = next(run_dir.glob("*.wandb")).read_bytes()  # the offline run's records
    assert b"rho_1" in data and str(out).encode() in data  # the resolved config, the run folder in it
    assert b"from-env" in data and b"lab" in data  # $WANDB_PROJECT honoured, --wandb_entity passed
    assert b"rewards/accuracies" in data  # TensorBoard's scalars synced
    assert list((run_dir / "files").rglob("events.out.tfevents.*"))  # and its event file


@pytest.mark.parametrize("script", MODULES)
def test_track_without_wandb_is_one_line_before_anything_is_written(monkeypatch, script):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    module = MODULES[script]
    with pytest.raises(module.InputError, match=re.escape("--track needs wandb: pip install 'selfpo[wandb]'")):
        module.resolve(module.Args(track=True))
