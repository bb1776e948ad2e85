"""Learning-rate schedules: `constant`, or linear warmup then cosine decay to a floor (nanoGPT's).

    lr_factor(k, schedule="cosine", warmup_steps=100, total_steps=2000, min_lr_ratio=0.1)  # step k's lr / base lr
    # lego.training.train_epoch(..., lr_factor=partial(lr_factor, ...)) sets step k's lr to base * lr_factor(k)

Steps count optimizer steps from 0; a budget of `total_steps` steps runs steps 0 .. total_steps - 1.
`cosine`: during warmup lr = base * (step + 1) / (warmup + 1) (never 0, reaches base at step `warmup`),
then half a cosine from base at `warmup_steps` down to `min_lr_ratio * base` at the budget's last step
(`total_steps - 1`), so every model trained to its budget ends annealed (SPEC section 6), and the
floor after. `constant`: base at every step
(warmup and floor belong to `cosine`), so training is bit-identical to having no scheduler.
The same schedule serves phase 1, phase 2 and every baseline (SPEC section 6: same schedule).
"""

from __future__ import annotations

import math

from lego.config import SCHEDULES


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The learning rate of optimizer step `step` over the base learning rate (exactly 1.0 for `constant`)."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule={schedule!r} is not allowed; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    last = total_steps - 1  # the budget's last step runs at the floor
    if step >= last:  # also covers a budget that ends within warmup: straight to the floor
        return min_lr_ratio
    progress = (step - warmup_steps) / (last - warmup_steps)  # 0 -> 1
    return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)

