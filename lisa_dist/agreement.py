"""Every rank must train the same layers: check it at each switch with one small collective.

Ranks that sample different sets of equal size do not fail under ZeRO-2, their replicas silently
diverge; sets of different sizes give mismatched collectives that hang
(docs/design.md#why-callback-lisa-saves-nothing). So
each switch all-gathers a fixed-size fingerprint of (switch index, active set, the probability
vector of weighted sampling, bit for bit) and every rank
compares all of them; on a mismatch every rank raises (a second collective fetches the sets for
the message), so none is left waiting in a collective.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def _fingerprint(switch_index: int, active: Sequence[int], probabilities: Optional[Sequence[float]] = None) -> int:
    text = f"{switch_index}:{','.join(str(int(i)) for i in active)}"
    if probabilities is not None:  # uniform sampling keeps the fingerprint it always had
        text += ":" + ",".join(float(p).hex() for p in probabilities)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1  # fits int64


def check_agreement(switch_index: int, active: Sequence[int], device: torch.device,
                    probabilities: Optional[Sequence[float]] = None) -> None:
    """Raise RuntimeError on every rank if any two ranks disagree on (switch index, active set,
    probability vector)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = torch.tensor([switch_index, len(active), _fingerprint(switch_index, active, probabilities)],
                        dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    sets: list = [None] * dist.get_world_size()
    probs = None if probabilities is None else [round(float(p), 6) for p in probabilities]
    dist.all_gather_object(sets, (int(switch_index), [int(i) for i in active], probs))
    listing = "; ".join(f"rank {r}: switch {k} layers {layers}" + ("" if p is None else f" probabilities {p}")
                        for r, (k, layers, p) in enumerate(sets))
    raise RuntimeError(
        f"LISA ranks disagree on the active decoder layers ({listing}). Every rank must run with the "
        f"same LisaConfig (seed, activated_layers, interval_steps, sampling), the same model and the same "
        f"optimizer step count; check the launch command and environment of the listed ranks")
