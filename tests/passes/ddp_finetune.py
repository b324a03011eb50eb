"""Run by tests/passes/test_finetune.py under torchrun: finetune a tiny CLIP, write a weight digest."""
import hashlib
import sys

import torch

from mmprune.context import Context
from mmprune.data.synthetic import SyntheticParams, SyntheticSource
from mmprune.graph import trace
from mmprune.models.clip import CLIPAdapter
from mmprune.passes.finetune import Finetune, FinetuneParams
from mmprune.training import init_distributed, world

init_distributed()
rank, size = world()
torch.manual_seed(0)
model = CLIPAdapter.tiny_model(0)
adapter = CLIPAdapter(model, *CLIPAdapter.default_processors(model))
data = SyntheticSource(SyntheticParams(task="retrieval", train_size=64, validation_size=16,
                                       test_size=16), seed=0).load(adapter)
ctx = Context(adapter, trace(adapter), data, "retrieval", seed=0, show_progress=False)
torch.manual_seed(1234 + rank)   # ranks must not depend on their own RNG state to agree
Finetune(FinetuneParams(steps=4, batch_size=8, lr=1e-3, select=False)).run(ctx)
digest = hashlib.sha256()
for name, t in sorted(model.state_dict().items()):
    digest.update(name.encode())
    digest.update(t.detach().contiguous().numpy().tobytes())
with open(f"{sys.argv[1]}/rank{rank}.txt", "w") as f:
    f.write(f"{size} {digest.hexdigest()}\n")
