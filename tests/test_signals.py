"""Faults a cluster job meets, in all four scripts: SIGTERM / SIGUSR1 / SIGINT (preemption, scancel, Ctrl-C) stop
after a whole training step with a step checkpoint and the exact command that continues the run, which then ends
bit-identical to an uninterrupted one; one job per run folder (an flock), and no fresh run over a finished one."""

import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_records
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sera  # noqa: E402

SCRIPTS = ("sera", "srdpo", "opsr", "osp")
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
SMALL = dict(global_batch=4, batch_size=4, num_eval=0)
TINY = {  # in-process runs of the toy, a few optimizer steps in each training loop
    "sera": dict(iterations=2, num_pairs=32, **SMALL),  # 8 steps per iteration
    "srdpo": dict(num_pairs=32, eval_pairs=0, **SMALL),  # 8 steps
    "opsr": dict(iterations=1, num_prompts=16, num_pairs=16, **SMALL),  # 4 steps (iteration 0), then 4
    "osp": dict(skip_augmentation=True, steps=4, save_every=0, num_judge_eval=8, eval_every=2, num_prompts=16)
    | dict(num_eval=0),  # Stage 1: 4 steps; a judge report after step 2 (the signalled one: made on resume)
}
# SELFPO_SIGNAL_AT: the signal the process sends itself inside its Nth optimizer step; where that step is
SIGNALLED = {
    "sera": ("SIGTERM@11", "iteration 2 step 3", "iter_2_partial"),
    "srdpo": ("SIGUSR1@5", "step 5", "checkpoint"),
    "opsr": ("SIGINT@6", "iteration 1 step 2", "iter_1_partial"),
    "osp": ("SIGTERM@2", "step 2", "checkpoint"),
}
FINAL = {"sera": "iter_2", "srdpo": "final", "opsr": "iter_1", "osp": "final"}


def unstamped(text: str) -> str:
    """A log's lines without the time each starts with (stdout is not a terminal here)."""
    return re.sub(r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "", text).strip()


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def fresh_process(module, monkeypatch):
    """The signal state of a new process: no signal seen, no step taken."""
    for name, value in dict(signum=None, at=None, where=None, defer=False, steps=0).items():
        monkeypatch.setattr(module.Stop, name, value)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_mid_training_checkpoints_the_step_and_resumes_bit_identically(script, tmp_path, monkeypatch, capsys):
    """The signal arrives inside a step (after its backward passes): the step is applied, a step checkpoint of it is
    written, and the run ends like Ctrl-C saying so (the script's __main__ then prints the command that continues and
    exits 128 + the signal's number: test_a_real_sigterm_...). --resume from there ends with the uninterrupted run's
    weights, bit for bit, and its records; --resume of the finished run names its final model."""
    module, (hook, where, partial) = importlib.import_module(script), SIGNALLED[script]
    full, cut, name = tmp_path / "full", tmp_path / "cut", hook.split("@")[0]
    fresh_process(module, monkeypatch)
    module.main(module.Args(**TINY[script], output_dir=str(full)))
    previous = signal.signal(getattr(signal, name), module.on_signal)  # as __main__ installs it
    try:
        fresh_process(module, monkeypatch)
        monkeypatch.setenv("SELFPO_SIGNAL_AT", hook)
        with pytest.raises(KeyboardInterrupt, match=f"^{name} after {where}: step checkpoint written$"):
            module.main(module.Args(**TINY[script], output_dir=str(cut)))
    finally:
        signal.signal(getattr(signal, name), previous)
    monkeypatch.delenv("SELFPO_SIGNAL_AT")
    step = int(where.split()[-1])
    assert json.loads((cut / partial / "trainer_state.json").read_text())["step"] == step
    steps = [m["step"] for m in map(json.loads, open(cut / "metrics.jsonl")) if "loss" in m]
    assert steps[-1] == step  # the step the signal came in was finished (and logged), no later one began
    fresh_process(module, monkeypatch)
    capsys.readouterr()
    module.main(module.Args(**TINY[script], output_dir=str(cut), resume=True))
    assert f"resuming from the step checkpoint {cut / partial} at step {step}" in capsys.readouterr().out
    a, b = weights(full / FINAL[script]), weights(cut / FINAL[script])
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_records(cut, full)
    module.main(module.Args(**TINY[script], output_dir=str(cut), resume=True))
    assert unstamped(capsys.readouterr().out).splitlines()[-1] == f"final model: {cut / FINAL[script]}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_resume_hint_names_the_interpreter_and_the_script_as_invoked(script, monkeypatch, tmp_path):
    """`continue with:` this Python and the script path as typed, the arguments less --output_dir, --overwrite and
    --stop_after_steps, then --resume and the run's folder."""
    module = importlib.import_module(script)
    argv = [f"../x/{script}.py", "--lr", "1e-4", "--output_dir", "old", "--overwrite", "--stop_after_steps=3"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(module.Logs, "run_dir", tmp_path / "my run")
    expected = f"continue with: {sys.executable} ../x/{script}.py --lr 1e-4 --resume --output_dir '{tmp_path}/my run'"
    assert module.resume_hint() == expected


HINT = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
import sera
sera.Logs.run_dir = Path("out")
print(sera.resume_hint())
"""


def test_under_torchrun_the_resume_hint_repeats_its_command_line(tmp_path):
    """torchrun's own options (read from the launcher's command line) stand before the script in the hint."""
    script = tmp_path / "hint.py"
    script.write_text(HINT.format(root=str(ROOT)))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1"]
    res = subprocess.run([*launcher, str(script), "--lr", "1"], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = " ".join([*launcher, str(script), "--lr", "1", "--resume", "--output_dir", "out"])
    assert unstamped(res.stdout).splitlines()[-1] == f"continue with: {expected}"


def test_a_real_sigterm_from_outside_stops_after_the_step_it_came_in(tmp_path):
    """scancel's SIGTERM, sent by another process while sera trains (many short steps): the step in flight finishes
    and is the step checkpoint's; the process prints the command that continues and exits 143."""
    argv = ["--iterations", "1", "--num_pairs", "256", "--global_batch", "2", "--batch_size", "2", "--num_eval", "0"]
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "sera.py"), *argv, "--output_dir", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or '"step": 2' not in (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    stopped = re.search(
        r"sera.py: interrupted \(SIGTERM after iteration 1 step (\d+): step checkpoint written\); ", stderr
    )
    assert stopped and int(stopped.group(1)) < 128, stderr[-3000:]
    hint = [sys.executable, str(ROOT / "sera.py"), *argv, "--resume", "--output_dir", str(out)]
    assert stderr.strip().endswith(f"continue with: {' '.join(hint)}"), stderr[-1000:]
    step = int(stopped.group(1))
    assert json.loads((out / "iter_1_partial" / "trainer_state.json").read_text())["step"] == step
    assert [m["step"] for m in map(json.loads, open(out / "metrics.jsonl")) if "loss" in m][-1] == step


SECOND = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import sera
signal.signal(signal.SIGTERM, sera.on_signal)
sera.Stop.defer = True  # inside a training step: the first signal waits for its end
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # the copy a launcher forwards: the same request
print("still running", flush=True)
time.sleep(1.5)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(10)
print("not reached", flush=True)
"""


def test_a_second_signal_exits_at_once():
    """A signal repeated within a second (torchrun forwards what its process group also got) is the same request;
    one after that ends the process at once, 128 + its number, saying so."""
    res = subprocess.run([sys.executable, "-c", SECOND, str(ROOT)], capture_output=True, text=True, env=ENV, timeout=60)
    assert res.returncode == 143 and res.stdout.split() == ["still", "running"], (res.stdout, res.stderr[-2000:])
    assert res.stderr.strip().endswith("a second SIGTERM: exiting now"), res.stderr[-2000:]


def test_a_signal_outside_a_training_step_ends_the_phase_at_once(monkeypatch):
    """Scoring, sampling, judging, evaluation: no step to finish, the phase ends now and is redone on resume. A
    signal in a training loop after its last step's statistics were summed ends the run when the loop ends."""
    fresh_process(sera, monkeypatch)
    with pytest.raises(KeyboardInterrupt, match="^SIGUSR1; what it cut short is redone on resume$"):
        sera.on_signal(signal.SIGUSR1, None)
    assert sera.Stop.signum == signal.SIGUSR1
    fresh_process(sera, monkeypatch)
    done = []
    with pytest.raises(KeyboardInterrupt, match="^SIGTERM after the loop's last step; it is redone on resume$"):
        for step in sera.signal_safe_steps(range(2)):
            if step == 1:
                sera.on_signal(signal.SIGTERM, None)  # deferred: the step goes on
            done.append(step)
    assert done == [0, 1] and not sera.Stop.defer


def _agreement_worker(rank, port, results):
    import datetime
    import types

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    signal.signal(signal.SIGTERM, sera.on_signal)
    weight, done = torch.nn.Parameter(torch.zeros(2)), []
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    args = types.SimpleNamespace(lora_r=0, max_grad_norm=1e9)
    try:
        for step in sera.signal_safe_steps(range(6)):
            if rank == 1 and step == 1:  # rank 1's signal comes inside step 2; rank 0 gets none
                os.kill(os.getpid(), signal.SIGTERM)
            weight.grad = torch.ones(2)
            stats = sera.StepStats(["loss"], torch.device("cpu"))
            sera.optimizer_step([weight], optimizer, scheduler, stats, args, f"step {step + 1}")
            done.append(step + 1)
            sera.stop_after_step(lora=False)
    except KeyboardInterrupt as err:
        results[rank] = (done, str(err), weight.tolist())
    finally:
        dist.destroy_process_group()


def test_ranks_stop_after_the_same_step():
    """Under torchrun a signal reaches ranks at different times (here only rank 1, inside step 2): the pending flag
    rides on the step's statistics all-reduce, so every rank applies step 2 and stops after it; a rank that stopped
    alone would leave the other waiting in the next step's collective."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_agreement_worker, args=(port, results), nprocs=2, join=True)
    assert results[0] == ([1, 2], "a signal to another rank after step 2: step checkpoint written", [-2.0, -2.0])
    assert results[1] == ([1, 2], "SIGTERM after step 2: step checkpoint written", [-2.0, -2.0])


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
