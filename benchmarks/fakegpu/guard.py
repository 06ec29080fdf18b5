"""NCCL's device rule for a fake process group, and object collectives that work without peers.

ProcessGroupNCCL takes only CUDA tensors of the current device ("No backend type associated with device type
cpu"); gloo, and torch's fake process group, take anything. `install()` wraps every tensor collective of
torch.distributed (and the functional collectives DTensor uses) so that a tensor elsewhere raises
`CollectiveDeviceError`, naming the collective, the tensor and the calling line outside torch.

The fake process group moves no data, so object collectives (which pickle into byte tensors and read sizes back)
cannot work through it; `install()` gives them one-process semantics instead: every rank holds this rank's object.
"""

from __future__ import annotations

import functools
import traceback

import torch
import torch.distributed as dist

TENSOR_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "scatter",
    "gather",
    "barrier",
    "all_gather_single",
    "reduce_scatter_single",
)
FUNCTIONAL_COLLECTIVES = (
    "all_reduce",
    "all_gather_single",
    "all_gather_tensor",
    "all_gather_tensor_autograd",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "reduce_scatter_tensor_autograd",
    "all_to_all_single",
    "all_to_all_single_autograd",
    "broadcast",
    "all_reduce_coalesced",
    "all_gather_into_tensor_coalesced",
    "reduce_scatter_tensor_coalesced",
)


class CollectiveDeviceError(RuntimeError):
    pass


def _tensors(value, path="arg"):
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{path}[{i}]")


def caller() -> str:
    """The innermost frame outside torch: the line of the project that started the collective."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("guard.py"):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"


CHECKED: dict[str, int] = {}  # collective -> calls checked


def check_devices(name: str, args, kwargs):
    """Raise unless every tensor argument (a DTensor's local shard) is on cuda:current_device()."""
    CHECKED[name] = CHECKED.get(name, 0) + 1
    wanted = torch.device("cuda", torch.cuda.current_device())
    for path, tensor in _tensors(list(args) + list(kwargs.values())):
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.device != wanted:
            raise CollectiveDeviceError(
                f"{name}: {path} is on {local.device} (shape {tuple(local.shape)}, {local.dtype}); NCCL needs "
                f"{wanted}; called from {caller()}"
            )


def _guarded(name, fn):
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        check_devices(name, args, kwargs)
        return fn(*args, **kwargs)

    guarded.nccl_guarded = True
    return guarded


def all_gather_object(object_list, obj, group=None):
    object_list[:] = [obj] * len(object_list)


def broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
    pass  # this rank's objects stand for rank src's


def gather_object(obj, object_gather_list=None, dst=None, group=None, group_dst=None):
    if object_gather_list is not None:
        object_gather_list[:] = [obj] * len(object_gather_list)


def scatter_object_list(
    scatter_object_output_list, scatter_object_input_list=None, src=None, group=None, group_src=None
):
    if scatter_object_input_list:
        scatter_object_output_list[0] = scatter_object_input_list[0]


LOCAL_OBJECT_COLLECTIVES = dict(
    all_gather_object=all_gather_object,
    broadcast_object_list=broadcast_object_list,
    gather_object=gather_object,
    scatter_object_list=scatter_object_list,
)


def install():
    """Idempotent. Patches torch.distributed, its distributed_c10d module and the functional collectives; returns
    a function that undoes it."""
    import torch.distributed._functional_collectives as funcol

    c10d = dist.distributed_c10d
    names = set(TENSOR_COLLECTIVES) | set(LOCAL_OBJECT_COLLECTIVES)
    saved = [
        (module, name, getattr(module, name)) for module in (dist, c10d) for name in names if hasattr(module, name)
    ]
    saved += [(funcol, name, getattr(funcol, name)) for name in FUNCTIONAL_COLLECTIVES if hasattr(funcol, name)]
    for name in TENSOR_COLLECTIVES:
        original = getattr(c10d, name, None)
        if original is None or getattr(original, "nccl_guarded", False):
            continue
        guarded = _guarded(f"dist.{name}", original)
        setattr(c10d, name, guarded)
        setattr(dist, name, guarded)
    for name in FUNCTIONAL_COLLECTIVES:
        original = getattr(funcol, name, None)
        if original is not None and not getattr(original, "nccl_guarded", False):
            setattr(funcol, name, _guarded(f"functional {name}", original))
    for name, local in LOCAL_OBJECT_COLLECTIVES.items():
        setattr(c10d, name, local)
        setattr(dist, name, local)

    def uninstall():
        for module, name, original in saved:
            setattr(module, name, original)

    return uninstall
