import os

import torch

# Without a GPU, the Triton kernels are tested in Triton's interpreter. This must be set before
# any @triton.jit function is defined, i.e. before `selfpo_kernels` is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def assert_same_records(resumed, full):
    """metrics.jsonl of a resumed run = the uninterrupted run's, record for record (timings aside): what the
    resumed run redid after its checkpoint is not logged twice. Used by the scripts' resume tests."""
    import json
    from pathlib import Path

    import pytest

    a, b = ([json.loads(line) for line in open(Path(d) / "metrics.jsonl")] for d in (resumed, full))
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/") and not k.endswith("per_sec")}  # noqa: E731
    assert [sorted(strip(r)) for r in a] == [sorted(strip(r)) for r in b], (len(a), len(b))
    for x, y in zip(a, b):
        for k, v in strip(y).items():
            assert x[k] == (pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True) if isinstance(v, float) else v), (k, x, y)
