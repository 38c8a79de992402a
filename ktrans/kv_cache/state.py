"""Per-request state slots of recurrent (linear-attention) layers, beside the paged KV cache.

A linear-attention layer (kv_cache/layers.py kind `linear`: Qwen3-Next's and Qwen3.5's Gated
DeltaNet) carries, per request, a short convolution state (the last kernel - 1 inputs of its
causal conv1d) and a recurrent state (one [k_dim, v_dim] matrix per value head) from one step to
the next. The tensors live in KVStorage (one pair per linear layer, on that layer's device); this
module hands out which rows a request uses.

A request gets one slot when it is admitted and gives it back when it finishes, is aborted or is
preempted (a preempted request recomputes from its first token, so its state starts from zero
again). Each slot owns two rows of every state tensor, and a step reads one and writes the other
(`rows()`); only when the step's forward succeeded does `commit()` make the written row the one
read next. So a step run twice — the engine re-running requests one by one after a batched
forward failed, a CUDA graph captured after its warm-up run — computes the same state both times,
as re-writing KV pages does. The last row (SCRATCH) belongs to nobody: CUDA-graph padding rows
and warm-up steps read and write it.

NOTE: a request whose first step starts at position 0 reads no state at all (the layer takes
zeros), so a slot is never cleared when handed out.
"""

from __future__ import annotations

from collections.abc import Hashable

from ktrans.errors import KtransError


def num_state_rows(num_slots: int) -> int:
    """Rows of each state tensor for `num_slots` slots: two per slot and the scratch row."""
    return 2 * num_slots + 1


class StatePool:
    """Which request owns which state slot, and which of the slot's two rows holds its state."""

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise KtransError(f"a recurrent-state pool needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.scratch_row = num_state_rows(num_slots) - 1
        self._free: list[int] = list(range(num_slots - 1, -1, -1))   # popped from the end: low slots first
        self._slot: dict[Hashable, int] = {}
        self._parity = [0] * num_slots                              # which of the two rows holds the state

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def holds(self, owner: Hashable) -> bool:
        return owner in self._slot

    def alloc(self, owner: Hashable) -> bool:
        """Give `owner` a slot (it keeps the one it has); False when none is free."""
        if owner in self._slot:
            return True
        if not self._free:
            return False
        self._slot[owner] = self._free.pop()
        return True

    def free(self, owner: Hashable) -> bool:
        """Return `owner`'s slot; False if it held none."""
        slot = self._slot.pop(owner, None)
        if slot is None:
            return False
        self._free.append(slot)
        return True

    def rows(self, owner: Hashable) -> tuple[int, int]:
        """(row read, row written) by `owner`'s next step."""
        slot = self._slot.get(owner)
        if slot is None:
            raise KtransError("a request without a recurrent-state slot was scheduled (slots are given on admission)")
        p = self._parity[slot]
        return 2 * slot + p, 2 * slot + 1 - p

    def commit(self, owner: Hashable) -> None:
        """`owner`'s step succeeded: the row it wrote is its state from now on (no-op without a slot)."""
        slot = self._slot.get(owner)
        if slot is not None:
            self._parity[slot] ^= 1

    def check(self) -> None:
        """Assert the invariants: every slot is free or held by exactly one owner."""
        held = sorted(self._slot.values())
        if sorted(held + self._free) != list(range(self.num_slots)):
            raise AssertionError(f"recurrent-state pool corrupted: {len(held)} held + {len(self._free)} free slots "
                                 f"do not partition {self.num_slots}")
