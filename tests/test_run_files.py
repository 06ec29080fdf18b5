"""The run's files against the faults of a cluster, in all four scripts: a kill inside the checkpoint swap, a full
disk (a write refused with an errno), corrupted or changed files on --resume, file modes under the umask.

The runs are in-process at tiny budgets (a run stopped by --stop_after_steps, resumed by main()); the behaviours of a
process (a real SIGKILL, the printed line, the exit code) are shown by one subprocess each."""

import dataclasses
import errno
import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRIPTS = ("sera", "srdpo", "opsr", "osp")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
WINDOWS = ("files", "manifest", "moved", "swapped")  # write_folder's kill_point()s, in order

# Each script's smallest run with a step checkpoint after every step, its own run files, and (but srdpo) a model
# folder it loads on --resume; cut by --stop_after_steps inside its last stage (the step checkpoint = STOP).
TINY = {
    "sera": dict(iterations=2, num_pairs=64, num_eval=0),  # 4 steps an iteration; cut in iteration 2
    "srdpo": dict(num_pairs=64, eval_pairs=0, num_eval=0),  # 4 steps
    "opsr": dict(iterations=1, num_pairs=32, num_prompts=48, num_eval=0),  # iteration 0: 2 steps, 1: 3
    "osp": dict(offline_fraction=0.1, num_sft=8, aug_epochs=1, num_judge_eval=0, num_eval=0, steps=4, num_prompts=8)
    | dict(prompts_per_step=2),
}
STOP = {"sera": 5, "srdpo": 2, "opsr": 3, "osp": 2}
CHECKPOINT = {"sera": "iter_2_partial", "srdpo": "checkpoint", "opsr": "iter_1_partial", "osp": "checkpoint"}
OWN = {  # the file of each script's own that --resume reads, and how it is damaged in the subprocess check
    "sera": ("offline_logps.pt", "truncated"),
    "srdpo": ("ref_logps.pt", "truncated"),
    "opsr": ("pairs_1.jsonl", "a row short"),
    "osp": ("stage0/model.safetensors", "zeros inside"),
}
MODEL_FOLDER = {"sera": "iter_1", "opsr": "iter_0", "osp": "stage0"}  # loaded (and verified) on --resume


def args_for(module, data: Path, out: Path, **more):
    return module.Args(**TINY[module.__name__], dataset=str(data), save_every=1, output_dir=str(out), **more)


def argv_for(script: str, data: Path, out: Path) -> list[str]:
    """The command line of args_for's run, --resume."""
    argv = [sys.executable, str(ROOT / f"{script}.py"), "--dataset", str(data), "--save_every", "1", "--resume"]
    for key, value in TINY[script].items():
        argv += [f"--{key}", str(value)]
    return argv + ["--output_dir", str(out)]


def final_weights(module, out: Path) -> dict:
    name = {"sera": "iter_2", "opsr": "iter_1"}.get(module.__name__, "final")
    return load_file(str(out / name / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per script, each made on first use: ("cut", script) the toy data file the runs read and a run cut after STOP
    steps (its step checkpoint, run files and model folder in place); ("whole", script) the weights that run ends
    with uncut."""
    made = {}

    def get(kind, script):
        if (kind, script) not in made:
            module, folder = importlib.import_module(script), tmp_path_factory.mktemp(f"{script}_{kind}")
            data = get("cut", script)[1] if kind == "whole" else folder / "prefs.jsonl"  # the toy's first 200 rows
            if kind == "cut":
                data.write_text("".join(open(ROOT / "assets" / "toy" / "data" / "prefs.jsonl").readlines()[:200]))
                with pytest.raises(KeyboardInterrupt):
                    module.main(args_for(module, data, folder / "run", stop_after_steps=STOP[script]))
                assert (folder / "run" / CHECKPOINT[script] / "manifest.json").exists()
            else:
                module.main(args_for(module, data, folder / "run"))
            made[kind, script] = (module, data, folder / "run")
        return made[kind, script]

    return get


def copy_run(runs, script, tmp_path):
    """A copy of the cut run: (the script's module, the data file, the run folder)."""
    module, data, cut = runs("cut", script)
    shutil.copytree(cut, tmp_path / "run")
    return module, data, tmp_path / "run"


def uncut_weights(runs, script):
    module, _, whole = runs("whole", script)
    return final_weights(module, whole)


def resume(module, data, out, **more):
    return module.main(args_for(module, data, out, resume=True, **more))


# ---- the checkpoint swap: a kill in each window leaves one whole checkpoint ----------------------------------


class Killed(BaseException):
    """A simulated kill -9: nothing after it runs (not an Exception: no handler of the runtime takes it)."""


def small_training(module):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler):
    model(torch.ones(2, 4)).pow(2).mean().backward()
    optimizer.step(), scheduler.step(), optimizer.zero_grad()


def restored_weights(module, folder: Path):
    model, _, _ = small_training(module)
    state = module.trainer_state(folder)
    if state is None:
        return None, None
    module.make_optimizer(model, 1e-2, 10, module.Args(warmup_ratio=0.0), state=state)
    return state["step"], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("first", [False, True], ids=["replacing", "first"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_kill_in_each_window_of_the_swap_leaves_one_whole_checkpoint(script, window, first, tmp_path, monkeypatch):
    """save_checkpoint of step 4 killed at each point of write_folder (files written; manifest written; the old
    folder moved aside; the new one renamed in): --resume finds the step 2 checkpoint whole before the old one is
    moved (none when there was none), the step 4 one from then on (a whole .tmp, its manifest written last, is
    completed into place, also where no checkpoint was before), with the weights saved at that step; the leftovers
    go, and the next save works. A .tmp without its manifest is never taken."""
    module = importlib.import_module(script)
    model, optimizer, scheduler = small_training(module)
    folder, saved = tmp_path / "checkpoint", {}
    for step in (1, 2, 3, 4):
        train_step(model, optimizer, scheduler)
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
        if step == 2 and not first:
            module.save_checkpoint(model, folder, optimizer, scheduler, 2)

    def kill_point(name):
        if name == window:
            raise Killed(name)

    with monkeypatch.context() as patch:
        patch.setattr(module, "kill_point", kill_point)
        with pytest.raises(Killed):
            module.save_checkpoint(model, folder, optimizer, scheduler, 4)
    if window in ("moved", "swapped") and not first:  # a swap cut after the old folder went aside
        assert (tmp_path / "checkpoint.old").is_dir()
    newer = WINDOWS.index(window) >= WINDOWS.index("manifest") if first else WINDOWS.index(window) >= 2
    step, weights = restored_weights(module, folder)
    expected = 4 if newer else None if first else 2
    assert step == expected, (window, first)
    if step is not None:
        assert all(torch.equal(weights[k], saved[step][k]) for k in weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if step is None else ["checkpoint"])
    module.save_checkpoint(model, folder, optimizer, scheduler, 5)
    assert module.trainer_state(folder)["step"] == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigkill_inside_the_swap_then_resume_ends_as_the_uncut_run(script, runs, tmp_path):
    """A real kill -9 (SELFPO_KILL_AT=moved) between the two renames of the next checkpoint of a resumed run: the
    folder is gone, its previous version in .old and the new one in .tmp; --resume completes the swap, continues
    from the new checkpoint and ends with the weights of the run that was never cut, bit for bit."""
    module, data, out = copy_run(runs, script, tmp_path)
    res = subprocess.run(argv_for(script, data, out), env={**ENV, "SELFPO_KILL_AT": "moved"}, capture_output=True)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    cut = [p.name for p in out.rglob("*.tmp") if p.is_dir()]
    assert len(cut) == 1 and not (out / cut[0][:-4]).exists(), cut
    resume(module, data, out)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.old"))
    weights, whole = final_weights(module, out), uncut_weights(runs, script)
    assert all(torch.equal(weights[k], whole[k]) for k in whole)


# ---- a write the file system refuses: one line, the previous checkpoint intact -----------------------------


def limited_file_size(limit: int):
    """Writes past `limit` bytes fail as the kernel fails them (EFBIG, SIGXFSZ ignored): a disk that is full for
    anything larger. Python-level output must go to capsys's buffers meanwhile (pytest's fd capture is a file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    def undo():
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)

    return undo


def one_line_write_error(err, path: Path, words: str):
    text = str(err)
    assert "\n" not in text and text.startswith(f"cannot write {path}: {words}"), text
    assert "the previous checkpoint is intact" in text, text


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # TensorBoard's writer thread
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_ends_in_one_line_and_resumes_when_it_has_room(script, runs, tmp_path, capsys):
    """Where every file over 512 KiB is refused (model and optimizer files; torch.save's writer drops the errno:
    found by a probe), the next checkpoint ends in one line naming it, the errno's words and that the previous
    checkpoint is intact, which it is; no .tmp is left (its space is freed). Resumed while nothing can be written,
    one line again (no TensorBoard traceback from its writer thread). With room, the run ends as the uncut one."""
    module, data, out = copy_run(runs, script, tmp_path)
    checkpoint = out / CHECKPOINT[script]
    before = (checkpoint / "manifest.json").read_bytes()
    undo = limited_file_size(1 << 19)
    try:
        with pytest.raises(module.InputError) as failed:
            resume(module, data, out)
    finally:
        undo()
    target = Path(str(failed.value).split(": ")[0].removeprefix("cannot write "))
    assert target.parent == out, failed.value  # the next model or step checkpoint
    one_line_write_error(failed.value, target, os.strerror(errno.EFBIG))
    assert (checkpoint / "manifest.json").read_bytes() == before and not list(out.rglob("*.tmp"))
    undo = limited_file_size(0)
    try:
        with pytest.raises(module.InputError) as full:
            resume(module, data, out)
    finally:
        undo()
    said = str(full.value)  # the run's lock file is its first write
    assert said == f"--output_dir: {out} cannot be written ({os.strerror(errno.EFBIG)})", said
    assert "Traceback" not in capsys.readouterr().err
    resume(module, data, out)
    weights, whole = final_weights(module, out), uncut_weights(runs, script)
    assert all(torch.equal(weights[k], whole[k]) for k in whole)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_metrics_line_cut_by_a_full_disk_is_dropped_when_the_run_ends(script, tmp_path):
    """An append to metrics.jsonl that a full disk cut short leaves a partial line: the resumed run's Logs.close
    (which keeps one record per position) drops it instead of ending in a JSON traceback."""
    module = importlib.import_module(script)
    module.check_resume(args := module.resolve(module.Args(output_dir=str(tmp_path)))[0])
    log = module.Logs(args, tmp_path, "run")
    log({"step": 1, "loss": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    log.close()
    assert module.read_run_file(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5, "global_step": 1}]


def test_no_space_left_names_the_file_and_keeps_the_previous_version(tmp_path, monkeypatch):
    """ENOSPC from a run file's write and from the safetensors writer of a step checkpoint (its text, errno 28):
    one line with the errno's words; the previous state.json and step checkpoint as they were, no temporary left."""
    import sera

    sera.write_atomic(tmp_path / "state.json", {"step": 2})
    model, optimizer, scheduler = small_training(sera)
    sera.save_checkpoint(model, tmp_path / "checkpoint", optimizer, scheduler, 2)

    def no_space(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", no_space)
        with pytest.raises(sera.InputError) as err:
            sera.write_atomic(tmp_path / "state.json", {"step": 4})
    one_line_write_error(err.value, tmp_path / "state.json", "No space left on device")
    import safetensors.torch

    def full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", full)
        with pytest.raises(sera.InputError) as err:
            sera.save_checkpoint(model, tmp_path / "checkpoint", optimizer, scheduler, 4)
    one_line_write_error(err.value, tmp_path / "checkpoint", "No space left on device")
    assert sera.read_run_file(tmp_path / "state.json") == {"step": 2} and sera.trainer_state(tmp_path / "checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "manifest.json", "state.json"]


def test_an_error_that_is_no_write_fault_stays_itself(tmp_path):
    """write_fault finds the errno in an OSError, in DCP's and safetensors' texts, else by a probe of the folder;
    an error of another kind where the folder takes a write is no write fault (it is raised as it was)."""
    import sera

    assert sera.write_fault(OSError(errno.EDQUOT, "quota"), tmp_path) == errno.EDQUOT
    assert sera.write_fault(RuntimeError("CheckpointException\nOSError: [Errno 30] Read-only"), tmp_path) == 30
    torch_save = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert sera.write_fault(torch_save, tmp_path) is None
    (tmp_path / "file").write_text("x")
    assert sera.write_fault(torch_save, tmp_path / "file") == errno.ENOTDIR  # the probe meets the fault
    with pytest.raises(ValueError, match="a bug"):
        with sera.writing(tmp_path / "x"):
            raise ValueError("a bug")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe is gone


# ---- corrupted or changed run files on --resume: one line naming the file ----------------------------------


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zeros_inside(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


def garbage(path: Path):
    path.write_text("{not json")


def edit_step(path: Path):
    path.write_text(path.read_text().replace('"step": ', '"step": 1'))


def row_short(path: Path):
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def shard(folder: Path) -> Path:
    return next((folder / "model").glob("*.distcp"))


DAMAGE = {  # name: (the file in the run folder, given the script; the damage; the scripts that have it)
    "resolved_config garbage": (lambda s: "resolved_config.json", garbage, SCRIPTS),
    "state.json garbage": (lambda s: "state.json", garbage, ("sera", "opsr", "osp")),  # srdpo's: written at its end
    "step checkpoint's DCP shard zeros": (lambda s: f"{CHECKPOINT[s]}/model/__0_0.distcp", zeros_inside, SCRIPTS),
    "model file zeros": (lambda s: f"{MODEL_FOLDER[s]}/model.safetensors", zeros_inside, tuple(MODEL_FOLDER)),
    "own file truncated": (lambda s: OWN[s][0], truncate, ("sera", "srdpo", "opsr")),
    "own pairs a row short": (lambda s: "pairs_iter_2.jsonl", row_short, ("sera",)),
}


STEP_DAMAGE = {  # a step checkpoint's files (trainer_state's checks, the same in every script)
    "trainer_state step edited": (lambda folder: folder / "trainer_state.json", edit_step),
    "rng file truncated": (lambda folder: folder / "rng_rank0.safetensors", truncate),
    "DCP shard zeros": (shard, zeros_inside),
    "optimizer shard truncated": (lambda folder: next((folder / "optimizer").glob("*.distcp")), truncate),
    "manifest deleted": (lambda folder: folder / "manifest.json", Path.unlink),
}


@pytest.mark.parametrize("case", list(STEP_DAMAGE))
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_damaged_step_checkpoint_is_refused_in_one_line_naming_the_file(script, case, tmp_path):
    """A step checkpoint whose trainer_state.json (an edited step), generators, weight or optimizer shard differs
    from its manifest, or that has none: trainer_state refuses it in one line naming the file (before: a traceback,
    or a silent resume at another step or with other weights)."""
    module = importlib.import_module(script)
    model, optimizer, scheduler = small_training(module)
    module.save_checkpoint(model, tmp_path / "checkpoint", optimizer, scheduler, 2)
    where, damage = STEP_DAMAGE[case]
    damage(target := where(tmp_path / "checkpoint"))
    with pytest.raises(module.InputError) as err:
        module.trainer_state(tmp_path / "checkpoint")
    assert "\n" not in str(err.value) and str(err.value).startswith(f"--resume: {target} "), err.value


@pytest.mark.parametrize("script,case", [(s, case) for case, (_, _, has) in DAMAGE.items() for s in has])
def test_a_damaged_run_file_is_refused_in_one_line_naming_it(script, case, runs, tmp_path):
    """Each file a resumed run reads (resolved_config.json, state.json, the step checkpoint, a model folder it
    loads, the cached reference log-probs and pairs) checked against the manifest that lists its size and sha256:
    damaged, --resume stops in one line naming it (before: tracebacks, or a silent resume with other data)."""
    where, damage, _ = DAMAGE[case]
    module, data, out = copy_run(runs, script, tmp_path)
    damage(target := out / where(script))
    damaged = target.read_bytes() if target.exists() else None
    with pytest.raises(module.InputError) as err:
        resume(module, data, out)
    text = str(err.value)
    assert "\n" not in text and str(target) in text and text.startswith("--resume: "), text
    assert (target.read_bytes() if target.exists() else None) == damaged  # left for the user to see


def damage_own(path: Path, how: str):
    {"truncated": truncate, "a row short": row_short, "zeros inside": zeros_inside}[how](path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_on_a_damaged_own_file_prints_one_line(script, runs, tmp_path):
    """The script's own file that --resume reads (sera's offline_logps.pt, srdpo's ref_logps.pt, opsr's pairs file,
    osp's Stage 0 model), damaged: `<script>.py: error: --resume: <file> ...`, exit 1, no traceback."""
    _, data, out = copy_run(runs, script, tmp_path)
    name, how = OWN[script]
    damage_own(out / name, how)
    res = subprocess.run(argv_for(script, data, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith(f"{script}.py: error: --resume: {out / name} "), res.stderr


def test_a_kill_between_a_run_file_and_its_manifest_resumes(tmp_path, monkeypatch):
    """write_atomic lists the new version in the manifest before renaming it in, and keeps the previous one listed:
    a kill between the two leaves the previous file, which is still accepted; another content is not."""
    import sera

    sera.write_atomic(tmp_path / "state.json", {"step": 2})
    real_replace = os.replace

    def cut(src, dst):
        if str(dst).endswith("state.json"):
            raise Killed("between the manifest and the rename")
        real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(sera.os, "replace", cut)
        with pytest.raises(Killed):
            sera.write_atomic(tmp_path / "state.json", {"step": 4})
    assert sera.read_run_file(tmp_path / "state.json") == {"step": 2}
    (tmp_path / "state.json").write_text(json.dumps({"step": 3}, indent=2))
    with pytest.raises(sera.InputError, match=r"state.json is not as this run wrote it"):
        sera.read_run_file(tmp_path / "state.json")


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # TensorBoard's writer thread
@pytest.mark.parametrize("script", SCRIPTS)
def test_logs_write_the_config_once_and_a_full_disk_in_one_line(script, tmp_path, capsys):
    """Logs writes resolved_config.json (with the inputs' digests) when the run starts, and leaves it as it is on
    --resume; a disk on which nothing can be written then ends in one line naming tb/ (TensorBoard's writer thread
    meets it first: no traceback of that thread)."""
    module = importlib.import_module(script)
    args = module.resolve(module.Args(output_dir=str(tmp_path)))[0]
    module.check_resume(args)
    module.record_input("--dataset", "1 abc")
    module.Logs(args, tmp_path, "run").close()
    config = tmp_path / "resolved_config.json"
    assert module.read_run_file(config)["inputs"] == {"--dataset": "1 abc"}
    before = (config.stat().st_ino, config.stat().st_mtime_ns, config.read_bytes())
    module.check_resume(args := dataclasses.replace(args, resume=True))
    module.record_input("--dataset", "1 abc")
    undo, running = limited_file_size(0), set(threading.enumerate())
    try:
        with pytest.raises(module.InputError) as full:
            module.Logs(args, tmp_path, "run")
    finally:
        undo()
    for thread in set(threading.enumerate()) - running:  # its writer thread's error seen in this test, not after it
        if type(thread).__name__ == "_AsyncWriterThread":
            thread.join(10)
    one_line_write_error(full.value, tmp_path / "tb", os.strerror(errno.EFBIG))
    assert (config.stat().st_ino, config.stat().st_mtime_ns, config.read_bytes()) == before
    module.Logs(args, tmp_path, "run").close()
    assert (config.stat().st_ino, config.stat().st_mtime_ns, config.read_bytes()) == before
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
def test_changed_data_is_refused_on_resume_unless_allowed(script, runs, tmp_path):
    """The same --dataset path with other rows: --resume stops in one line before anything is written (the run's
    cached reference log-probs and pairs are of the old rows); --allow_changed_inputs goes on."""
    module, data, out = copy_run(runs, script, tmp_path)
    config, text = out / "resolved_config.json", data.read_text()
    started = module.read_run_file(config)["inputs"]["--dataset"]
    rows = text.splitlines(keepends=True)
    try:
        data.write_text("".join(rows[1:] + rows[:1]))  # the same rows, another order
        with pytest.raises(module.InputError, match=r"^--resume: --dataset's contents differ from those the run"):
            resume(module, data, out)
        resume(module, data, out, allow_changed_inputs=True)  # the run goes on: its record names the new rows
    finally:
        data.write_text(text)
    assert started != module.read_run_file(config)["inputs"]["--dataset"] == module.RunFiles.digests["--dataset"]


def test_a_changed_model_is_refused_on_resume(tmp_path, monkeypatch):
    """--model: a folder whose weights another training changed since the run started (same path, same names and
    sizes) is refused unless allowed (the digest reads 64 KiB at 16 places of each file: cheap at 7B)."""
    from transformers import AutoModelForCausalLM

    import sera

    model = tmp_path / "model"
    shutil.copytree(ROOT / "assets" / "toy" / "model", model)
    start = sera.model_digest(str(model))
    trained = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    trained.save_pretrained(model)
    monkeypatch.setattr(sera.RunFiles, "saved", {"inputs": {"--model": start}})
    monkeypatch.setattr(sera.RunFiles, "digests", {})
    monkeypatch.setattr(sera.RunFiles, "allow_changed", False)
    with pytest.raises(sera.InputError, match=r"--model's contents differ .* pass --allow_changed_inputs"):
        sera.load_tokenizer(str(model), None)
    monkeypatch.setattr(sera.RunFiles, "allow_changed", True)
    sera.load_tokenizer(str(model), None)
    assert sera.RunFiles.digests["--model"] != start


# ---- file modes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o077, 0o600), (0o022, 0o644)])
def test_run_and_checkpoint_files_get_the_umask_mode(umask, mode, tmp_path):
    """Every file of a step checkpoint (its manifest included) and the run files with their manifest get 0o666
    less the umask (0o600 under 077, 0o644 under 022; `0o666 & ~os.umask(os.umask(0))` gave 0o666)."""
    import sera

    model, optimizer, scheduler = small_training(sera)
    old = os.umask(umask)
    try:
        sera.save_checkpoint(model, tmp_path / "checkpoint", optimizer, scheduler, 1)
        sera.write_atomic(tmp_path / "state.json", {"step": 1})
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*") if p.is_file()}
    assert "checkpoint/manifest.json" in modes and "manifest.json" in modes
    assert modes == dict.fromkeys(modes, oct(mode))
