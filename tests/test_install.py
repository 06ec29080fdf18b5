"""A fresh install works with today's releases: our package name is our own, transformers' layers are its own
(no kernels fetched from the Hub), and a run never lands on the CPU by accident where a GPU was meant.

Marked `smoke`: `.ci/run` also runs these in an environment of the newest releases the pyproject ranges allow."""

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import selfpo_kernels  # noqa: E402
import sera  # noqa: E402
import srdpo  # noqa: E402

SCRIPTS = ("sera", "srdpo", "opsr", "osp")
pytestmark = pytest.mark.smoke


def test_no_top_level_name_of_ours_is_another_distributions():
    """Every top-level import name that the `selfpo` distribution installs belongs to it alone (transformers >= 5.25
    requires Hugging Face's package `kernels`: a package of ours by that name shadowed it, or was shadowed)."""
    ours = [name for name, dists in importlib.metadata.packages_distributions().items() if "selfpo" in dists]
    assert ours, "the selfpo distribution is not installed (pip install -e .)"
    shared = {name: dists for name, dists in importlib.metadata.packages_distributions().items() if name in ours}
    assert all(set(dists) == {"selfpo"} for dists in shared.values()), shared
    assert ours == ["selfpo_kernels"], ours


def test_no_folder_of_ours_shadows_an_installed_package():
    """A script runs with the checkout first on sys.path: no folder at its root may carry the name of a package
    installed beside ours (a root folder `kernels` hid Hugging Face's `kernels` from transformers)."""
    installed = {name for name, dists in importlib.metadata.packages_distributions().items() if "selfpo" not in dists}
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert not (folders | modules) & installed, (folders | modules) & installed
    assert not (ROOT / "kernels").exists()


def test_transformers_imports_its_own_kernels_package_after_ours():
    """Ours first, then transformers' activations (which import Hugging Face's `kernels` where it is installed),
    then a Llama loaded by the scripts' own loader: the modules are the right ones and the layers are transformers'
    own (no hub kernel swapped in: transformers >= 5.25 would, by default)."""
    import transformers.activations  # noqa: F401  (sera imported selfpo_kernels above)

    hub = sys.modules.get("kernels")
    if hub is not None:  # installed with transformers >= 5.25
        assert Path(hub.__file__).resolve().parent != ROOT / "kernels", hub.__file__  # a virtualenv may live in ROOT
        assert hasattr(hub, "kernelize") and importlib.metadata.packages_distributions()["kernels"] == ["kernels"]
    assert Path(selfpo_kernels.__file__).resolve().parent == ROOT / "selfpo_kernels"
    model = sera.load_model(str(ROOT / "assets" / "toy" / "model"), torch.device("cpu"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "use_kernels", False) is False
    ids = torch.tensor([[1, 5, 9, 2]])
    logps, _ = selfpo_kernels.causal_lm_logps(model, ids, torch.ones_like(ids), ids.clone(), impl="torch")
    assert logps.shape == (1,) and torch.isfinite(logps).all() and logps.item() < 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_model_load_turns_hub_kernels_off(script):
    """Every from_pretrained of a model (policy, reference, sampling copy, reward model) passes use_kernels=False."""
    text = (ROOT / f"{script}.py").read_text()
    loads = re.findall(r"AutoModel\w*\.from_pretrained\((.*?)\)\n", text, flags=re.S)
    assert loads and all("**NO_HUB_KERNELS" in call for call in loads), loads
    assert importlib.import_module(script).NO_HUB_KERNELS == {"use_kernels": False}


# ---- --device: no silent CPU run where a GPU was meant -------------------------------------------------------------


@pytest.fixture
def machine(monkeypatch):
    """A stand-in for what torch and the OS report: visible GPUs, an NVIDIA driver, torchrun's rank counts."""

    def set_(gpus=0, driver=False, ranks=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        for module in (sera, srdpo):
            monkeypatch.setattr(module, "nvidia_driver", lambda: driver)
        for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            if ranks is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(ranks))

    return set_


@pytest.mark.parametrize(
    "gpus, driver, ranks, requested, paper_preset, expected",
    [
        (0, False, None, "auto", False, "cpu"),  # the toy on a laptop
        (0, False, 2, "auto", False, "cpu"),  # the toy on CPU ranks (gloo)
        (1, True, None, "auto", False, "cuda"),
        (8, True, 8, "auto", True, "cuda"),
        (4, True, 8, "auto", True, "8 ranks on this node needs 8 GPU"),
        (0, True, None, "auto", False, "an NVIDIA driver is loaded"),  # a CUDA build newer than the driver
        (0, False, None, "auto", True, "mistral-7b \\(a paper preset\\)"),
        (0, False, None, "cuda", False, "--device cuda needs"),
        (0, True, 8, "cpu", True, "cpu"),  # on purpose
        (2, True, None, "cpu", False, "cpu"),
    ],
)
def test_choose_device(machine, gpus, driver, ranks, requested, paper_preset, expected):
    machine(gpus=gpus, driver=driver, ranks=ranks)
    needs = "--model mistral-7b (a paper preset)" if paper_preset else None
    if expected in ("cpu", "cuda"):
        assert sera.choose_device(requested, needs) == expected
        return
    with pytest.raises(sera.InputError, match=expected) as err:
        sera.choose_device(requested, needs)
    message = str(err.value)
    assert "\n" not in message and "--device cpu" in message and f"torch {torch.__version__}" in message
    assert ("none: a CPU build" if torch.version.cuda is None else torch.version.cuda) in message


def test_paper_preset_on_a_machine_without_gpu_is_refused_before_anything_is_written(tmp_path):
    """`python sera.py --model mistral-7b` where torch sees no GPU: one line naming what to do, exit 1, no run folder
    (before, it went on towards a CPU run of a 7B model). --device cpu gets past the check."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, str(ROOT / "sera.py"), "--model", "mistral-7b", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sera.py: error: --device: --model mistral-7b"), res.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()
    res = subprocess.run(
        [sys.executable, str(ROOT / "sera.py"), "--model", "mistral-7b", "--device", "cpu", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert res.returncode == 1 and "--device" not in res.stderr, res.stderr  # the hub is offline here: a load error


# ---- the toy on several ranks runs as it is ------------------------------------------------------------------------


@pytest.mark.parametrize("ranks, expected", [(1, 16), (2, 8), (3, None), (4, 4), (16, 1)])
def test_unset_batch_size_fits_the_ranks(monkeypatch, ranks, expected):
    """--global_batch 16 (the toy's) on N ranks: the largest micro-batch up to the preset's 16 that divides it; with
    no such size (3 ranks) and with an explicit --batch_size that does not fit, the clear error stays."""
    monkeypatch.setenv("WORLD_SIZE", str(ranks))
    monkeypatch.setattr(sera, "nvidia_driver", lambda: False)
    monkeypatch.setattr(srdpo, "nvidia_driver", lambda: False)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for module in (sera, srdpo):
        if expected is None:
            with pytest.raises(module.InputError, match="--global_batch 16 must be a positive multiple"):
                module.resolve(module.Args())
            continue
        args = module.resolve(module.Args())[0]
        assert (args.global_batch, args.batch_size, args.device) == (16, expected, "cpu")
        assert module.accumulation(args.global_batch, args.batch_size) * args.batch_size * ranks == 16
        if ranks > 1:
            with pytest.raises(module.InputError, match=f"--batch_size 16 x {ranks} ranks"):
                module.resolve(module.Args(batch_size=16))


# ---- the four default toy runs, at tiny budgets ---------------------------------------------------------------------

TINY = {
    "sera": ["--iterations", "2", "--num_pairs", "32", "--num_eval", "8"],
    "srdpo": ["--num_pairs", "32", "--eval_pairs", "16", "--num_eval", "8"],
    "opsr": ["--iterations", "2", "--num_prompts", "16", "--num_pairs", "32", "--num_eval", "8"],
    "osp": ["--num_sft", "32", "--aug_epochs", "1", "--num_prompts", "16", "--steps", "2", "--num_eval", "8"]
    + ["--num_judge_eval", "16", "--eval_every", "0"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_default_toy_run_at_a_tiny_budget(tmp_path, script):
    """Each script's default job, run from a copy of the script alone in an empty folder (README "Copy a script into
    your code": the toy world is found in the checkout selfpo_kernels is installed from), ends with its final model:
    finite weights that moved from the toy's, and no `kernels` module of ours on the way."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the installed package, as a user's copy finds it
    out, copy = tmp_path / "run", tmp_path / "mine" / f"{script}.py"
    copy.parent.mkdir()
    shutil.copy(ROOT / f"{script}.py", copy)
    res = subprocess.run(
        [sys.executable, str(copy), *TINY[script], "--output_dir", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    final = Path(re.search(r"^\S+ \S+ final model: (.+)$", res.stdout, flags=re.M).group(1))  # a timestamped line
    weights, start = (
        load_file(str(final / "model.safetensors")),
        load_file(str(ROOT / "assets/toy/model/model.safetensors")),
    )
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert max((weights[k] - start[k]).abs().max().item() for k in start) > 0  # trained


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_copy_without_the_toy_world_says_where_to_find_it(tmp_path, script):
    """A copied script whose selfpo_kernels comes from no checkout (no assets/ beside it) refuses --model toy in one
    line saying what to do, before anything is written."""
    (tmp_path / "site").mkdir()
    shutil.copytree(ROOT / "selfpo_kernels", tmp_path / "site" / "selfpo_kernels")
    shutil.copy(ROOT / f"{script}.py", tmp_path / f"{script}.py")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    res = subprocess.run(
        [sys.executable, f"{script}.py", "--output_dir", "out"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert res.returncode != 0 and not (tmp_path / "out").exists()
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"{script}.py: error: --model toy: the toy world (assets/toy) is neither next to this script"
    )
    assert str(tmp_path / "site") in last and "pip install -e <checkout>" in last
