"""Faults a cluster job meets, in all four scripts: one job per run folder (an flock), and no fresh run over a
finished one."""

import importlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCRIPTS = ("sera", "srdpo", "opsr", "osp")
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
SMALL = dict(global_batch=4, batch_size=4, num_eval=0)
TINY = {  # in-process runs of the toy, a few optimizer steps in each training loop
    "sera": dict(iterations=2, num_pairs=32, **SMALL),  # 8 steps per iteration
    "srdpo": dict(num_pairs=32, eval_pairs=0, **SMALL),  # 8 steps
    "opsr": dict(iterations=1, num_prompts=16, num_pairs=16, **SMALL),  # 4 steps (iteration 0), then 4
    "osp": dict(skip_augmentation=True, steps=4, save_every=0, num_judge_eval=8, eval_every=2, num_prompts=16)
    | dict(num_eval=0),  # Stage 1: 4 steps
}

# ---- one job per run folder ------------------------------------------------------------------------------------

HOLD = """
import fcntl, os, socket, sys, time
lock = open(sys.argv[1], "a+")
fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
lock.write(f"pid {os.getpid()} on {socket.gethostname()}\\n")
lock.flush()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A run folder whose run.lock another process holds, as lock_run takes it."""
    folder = tmp_path_factory.mktemp("held") / "run"
    folder.mkdir()
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder / "run.lock")], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    yield folder, child.pid
    child.kill()
    child.wait()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_second_job_on_a_run_folder_is_refused_naming_the_holder(script, held):
    """Two jobs given one --output_dir: the second ends in one line naming the first's pid and host, having
    written nothing there."""
    folder, pid = held
    module = importlib.import_module(script)
    holder = re.escape(f"--output_dir: {folder} is in use by pid {pid} on {socket.gethostname()} (one job per folder)")
    with pytest.raises(module.InputError, match=f"^{holder}$"):
        module.main(module.Args(**TINY[script], output_dir=str(folder)))
    assert [p.name for p in folder.iterdir()] == ["run.lock"]


ONE_STEP = {  # in-process runs of one or two steps
    "sera": dict(iterations=1, num_pairs=8, **SMALL),
    "srdpo": dict(num_pairs=8, eval_pairs=0, **SMALL),
    "opsr": dict(iterations=1, num_prompts=4, num_pairs=4, **SMALL),
    "osp": dict(TINY["osp"], steps=1),
}
ONE_STEP_FINAL = {"sera": "iter_1", "srdpo": "final", "opsr": "iter_1", "osp": "final"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_fresh_run_into_a_run_folder_is_refused_and_overwrite_starts_over(script, tmp_path):
    """A run without --resume into a folder that holds a run (its resolved_config.json or state.json) ends in one
    line and changes nothing; with --overwrite the old run's files go and the new run writes its own (and names
    itself in run.lock while it runs)."""
    module, out = importlib.import_module(script), tmp_path / "run"
    (out / "iter_7").mkdir(parents=True)
    (out / "state.json").write_text('{"completed": 7}')
    (out / "metrics.jsonl").write_text('{"old": 1}\n')
    message = f"--output_dir: {out} holds a run (state.json); --resume continues it, --overwrite starts over"
    with pytest.raises(module.InputError, match=f"^{re.escape(message)}$"):
        module.main(module.Args(**ONE_STEP[script], output_dir=str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["iter_7", "metrics.jsonl", "run.lock", "state.json"]
    assert (out / "metrics.jsonl").read_text() == '{"old": 1}\n'
    module.main(module.Args(**ONE_STEP[script], output_dir=str(out), overwrite=True))
    assert not (out / "iter_7").exists() and (out / ONE_STEP_FINAL[script] / "model.safetensors").exists()
    assert '"old"' not in (out / "metrics.jsonl").read_text() and json.loads((out / "state.json").read_text())
    assert (out / "run.lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    with pytest.raises(module.InputError, match="--resume continues the run in --output_dir, --overwrite deletes it"):
        module.main(module.Args(**ONE_STEP[script], output_dir=str(out), overwrite=True, resume=True))
