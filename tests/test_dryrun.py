"""benchmarks/dryrun.py's own logic on the CPU build of torch (the dry run itself needs the CUDA build, see README):
which presets it drives, the names it calls in the scripts, the NCCL device rule of its fake process group, and
its stand-in host reads of fake tensors."""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "fakegpu"))
dryrun = importlib.import_module("dryrun")
guard = importlib.import_module("guard")


def parameter_count(config: dict) -> int:
    """A Llama/Mistral decoder's parameters from its config values (untied head)."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    return 2 * config["vocab_size"] * hidden + layers * per_layer + hidden


def test_every_7b_preset_is_driven_with_a_7b_config():
    runs = dryrun.presets()
    for script in dryrun.SCRIPTS:
        module = importlib.import_module(script)
        for name, preset in module.MODELS.items():
            if "7b" in name.lower() or "7b" in preset["path"].lower():
                lora = preset.get("lora_r", 0) > 0
                assert [r for s, n, r in runs if (s, n) == (script, name)] == ([1, 8] if lora else [8]), (script, name)
                assert preset["path"] in dryrun.CONFIGS, f"{script} {name}: no model config for {preset['path']}"
    assert {(s, n) for s, n, _ in runs} >= {
        ("sera", "mistral-7b"),
        ("srdpo", "zephyr-7b"),
        ("opsr", "mistral-7b"),
        ("opsr", "mistral-7b-instruct"),
        ("osp", "mistral-7b"),
    }
    for path, (_, config) in dryrun.CONFIGS.items():
        assert 7.2e9 < parameter_count(config) < 7.3e9, path  # Mistral-7B: 7.24B


def test_scripts_keep_the_names_the_dry_run_calls():
    for script in dryrun.SCRIPTS:
        module = importlib.import_module(script)
        missing = [n for n in dryrun.SCRIPT_API["all"] + dryrun.SCRIPT_API[script] if not hasattr(module, n)]
        assert not missing, f"{script}.py lacks {missing} (benchmarks/dryrun.py SCRIPT_API)"


@pytest.fixture
def fake_group(monkeypatch):
    """Two ranks of torch's fake process group (no peers), this one rank 0 on 'cuda:0', with the NCCL rule."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    uninstall = guard.install()
    yield
    uninstall()
    dist.destroy_process_group()


def test_guard_rejects_a_cpu_tensor_and_names_the_caller(fake_group, monkeypatch):
    with pytest.raises(
        guard.CollectiveDeviceError,
        match=r"dist\.all_reduce: arg\[0\] is on cpu \(shape \(3,\), "
        r"torch\.float32\); NCCL needs cuda:0; called from "
        r".*test_dryrun\.py",
    ):
        dist.all_reduce(torch.zeros(3))
    with pytest.raises(guard.CollectiveDeviceError, match=r"dist\.all_gather: arg\[0\]\[0\] is on meta"):
        dist.all_gather([torch.zeros(2, device="meta")] * 2, torch.zeros(2, device="meta"))
    import sera  # a script's collective on the CPU (comm_device forced there, as before a fix): what NCCL refuses

    monkeypatch.setattr(sera, "comm_device", lambda: torch.device("cpu"))

    with pytest.raises(guard.CollectiveDeviceError, match=r"float64.*sera\.py:\d+ \(all_sum\)"):
        sera.all_sum([1.0, 2.0])


def test_guard_is_undone_and_object_collectives_are_local(fake_group):
    import sera

    assert getattr(dist.all_reduce, "nccl_guarded", False)
    assert sera.gather([1, 2]) == [1, 2, 1, 2]  # every rank holds this rank's objects
    stamp = [5]
    dist.broadcast_object_list(stamp, 0)
    assert stamp == [5]


def test_guard_uninstall_restores_torch():
    from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401 - registers the fake backend

    original = dist.all_reduce
    uninstall = guard.install()
    assert dist.all_reduce is not original and dist.distributed_c10d.all_reduce is dist.all_reduce
    uninstall()
    assert dist.all_reduce is original and not getattr(dist.all_gather_object, "nccl_guarded", False)
    assert dist.all_gather_object is dist.distributed_c10d.all_gather_object


def test_host_reads_of_fake_tensors_read_as_ones():
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    with FakeTensorMode():
        perm = torch.randperm(4)
        with pytest.raises(DataDependentOutputException):
            perm.tolist()
        with dryrun.host_reads_as_ones():
            assert perm.tolist() == [1, 1, 1, 1]
            assert perm.sum().item() == 1 and not bool(perm.any()) and float(perm.float().mean()) == 1.0
            assert torch.tensor(3.5).item() == 3.5  # a known constant still reads as itself
        with pytest.raises(DataDependentOutputException):
            perm.sum().item()
    assert torch.arange(3).tolist() == [0, 1, 2]  # real tensors untouched
