"""plumbing/batches.py: batches in global terms, dealt to processes as the release's sampler does.

The release trains 4 processes x a per-GPU batch; here the global batch is the unit (`--batch`),
split over processes (torchrun) and micro-batches (`--accum`) by `BatchLayout`, and `RunSampler`
deals each epoch's permutation to those (world x accum) virtual ranks as DistributedSampler deals
it to the release's processes: --accum 4 on one GPU sees the samples of a 4-process run of this
code in the same order. An epoch has as many steps as that sampler gives (the unlabelled list
padded to a multiple of 4).
"""

import math
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

from plumbing.catalog import RELEASE_PROCESSES
from plumbing.errors import UserError


@dataclass(frozen=True)
class BatchLayout:
    """A global batch (labelled images per optimizer step, and as many unlabelled) computed by
    `world` processes x `accum` micro-batches of `micro` images: world x accum virtual ranks, each
    exactly one process of a (world x accum)-process run. The release: global 4 = 4 processes x 1
    (whdld 8 = 4 x 2). pad: epochs as the release counts them, the unlabelled list padded by
    repeating its start to a multiple of its 4 processes (and of ours), as its DistributedSampler
    does. False: the rule of runs made before it (the remainder dropped), kept so that they resume
    as they were started."""

    global_batch: int
    world: int = 1
    accum: int = 1
    rank: int = 0
    pad: bool = True

    def __post_init__(self):
        if self.global_batch < 1 or self.accum < 1 or self.global_batch % (self.world * self.accum):
            per = self.global_batch // self.world if self.global_batch % self.world == 0 else 0
            valid = [str(a) for a in range(1, per + 1) if per % a == 0]
            raise UserError(
                f"--batch {self.global_batch} (global) does not split into {self.world} "
                f"process(es) x --accum {self.accum} micro-batches; valid --accum: "
                f"{', '.join(valid) or 'none (make --batch a multiple of the processes)'}"
            )

    @property
    def ranks(self):
        return self.world * self.accum

    @property
    def micro(self):
        return self.global_batch // self.ranks

    def epoch_order(self, perm):
        """An epoch's permutation of the unlabelled list as it is dealt to the virtual ranks."""
        if not self.pad:
            return perm[: len(perm) // self.ranks * self.ranks]
        multiple = math.lcm(RELEASE_PROCESSES, self.ranks)
        length = -(-len(perm) // multiple) * multiple  # ceil(n / multiple) * multiple
        return (perm * -(-length // max(len(perm), 1)))[:length]

    def steps_per_epoch(self, n):
        """Optimizer steps per pass over n unlabelled images (potsdam 1/16: 1,155; whdld 1/24:
        533)."""
        return len(self.epoch_order(list(range(n)))) // self.global_batch

    def describe(self):
        split = f"{self.global_batch} = {self.world} process{'es' if self.world > 1 else ''}"
        return f"global batch {split} x accum {self.accum} x micro-batch {self.micro}"


class RunSampler(Sampler):
    """(epoch, index) keys for the optimizer steps of `steps` (a range), layout.accum micro-batches
    of layout.micro keys per step on this rank. Epoch e's order is a permutation seeded by seed + e,
    dealt like DistributedSampler to the layout's virtual ranks: micro-batch j of a step on rank r
    is what rank r x accum + j of a (world x accum)-process run gets. So --accum 4 on one GPU sees
    the samples of a 4-process run of this code in the same order, and one micro-batch of 4 sees
    the same 4 images per step. An epoch's order is torch's DistributedSampler's (seed + e, as
    its set_epoch): at seed 0, with the release's shared order (data.train_loaders), the
    release's own order of samples."""

    def __init__(self, n, layout, seed, steps):
        self.n, self.layout, self.seed, self.steps = n, layout, seed, steps
        self.steps_per_epoch = layout.steps_per_epoch(n)  # train.py refuses a layout with none

    def __iter__(self):
        order, lay = None, self.layout
        for step in self.steps:
            epoch, it = divmod(step, self.steps_per_epoch)
            if order is None or order[0] != epoch:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                order = (epoch, lay.epoch_order(torch.randperm(self.n, generator=gen).tolist()))
            for j in range(lay.accum):
                mine = order[1][lay.rank * lay.accum + j :: lay.ranks]
                yield from ((epoch, i) for i in mine[it * lay.micro : (it + 1) * lay.micro])

    def __len__(self):
        return len(self.steps) * self.layout.accum * self.layout.micro
