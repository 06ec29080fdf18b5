import os

import torch

# Without a GPU, the Triton kernels are tested in Triton's interpreter. This must be set before
# any @triton.jit function is defined, i.e. before `kernels` is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
