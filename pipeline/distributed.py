"""This process's place in a multi-process launch (`accelerate launch`, `torchrun`).

Under a launcher every rank runs the whole CLI. Only the main process may prepare stage
folders, write manifests, rename folders into place and talk to MLflow; the other ranks
join the stages that train across processes (finetune) and otherwise wait at a barrier
while the main process runs a stage once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    index: int = 0
    count: int = 1

    @classmethod
    def detect(cls) -> Ranks:
        """From the launcher's environment; a plain process is rank 0 of 1 (nothing initialised)."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        """Wait for every rank (through the same process group the trainer uses)."""
        if self.count > 1:
            accelerate_state().wait_for_everyone()


def accelerate_state():
    """accelerate's process state, set up once per process (gloo on CPU, NCCL on CUDA).

    On a machine without CUDA, accelerate treats a torchrun launch as a single process unless
    told `cpu=True`: every rank would then train alone and write as rank 0. The state is a
    singleton, so the first caller decides for the trainer too."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
