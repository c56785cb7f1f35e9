import os

import torch

# Triton kernels run on CPU tensors only under the interpreter, which must be
# switched on before any kernel is decorated (i.e. before attnprof.kernels.triton_stats imports).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests use tiny tensors: one thread is fastest and never waits on a busy core.
torch.set_num_threads(1)
