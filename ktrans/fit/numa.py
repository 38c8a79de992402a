"""NUMA layout of the CPU experts: replicate them on every node or split each across the nodes.

Both layouts read only node-local memory (csrc/moe/moe.h): `replicate` keeps a full copy per
node and splits the work by output rows; `split` gives node g the I-slice g of every expert and
adds the nodes' partial outputs at the end. Replication therefore costs one more copy of the
experts per node and saves that cross-node reduction; it is chosen when every node has room for
a full copy beside its share of the rest, else `split` (one copy in all). Pure: tested with
simulated topologies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 2**30


@dataclass(frozen=True)
class NumaChoice:
    mode: str | None            # "replicate" | "split"; None: one node, nothing to choose
    nodes: int                  # thread groups (one per node)
    copies: int                 # copies of the CPU experts in RAM
    notes: list[str] = field(default_factory=list)   # the choice and its cost, for explain


def choose_numa(expert_bytes: int, other_bytes: int, profile, ram_reserve: int, margin: float) -> NumaChoice:
    """Layout of `expert_bytes` (one copy of the CPU experts) beside `other_bytes` of other RAM use."""
    nodes = [n for n in profile.numa_nodes if n.mem_total > 0]
    if len(nodes) < 2 or expert_bytes == 0:
        return NumaChoice(None, 1, 1)
    k = len(nodes)
    per_node_other = (other_bytes + ram_reserve) / k
    room = [max(0.0, (n.mem_free - per_node_other) * (1 - margin)) for n in nodes]
    rep, spl = k * expert_bytes, expert_bytes
    cost = (f"replicate: {rep / GiB:.1f} GiB of experts ({k} copies), split: {spl / GiB:.1f} GiB "
            f"(one copy, nodes' partial outputs added per layer)")
    if all(r >= expert_bytes for r in room):
        return NumaChoice("replicate", k, k, [f"NUMA: {k} nodes, experts replicated on each: every node has room "
                                              f"for a copy ({cost})"])
    smallest = min(room) / GiB
    return NumaChoice("split", k, 1, [f"NUMA: {k} nodes, experts split across them: a copy per node does not fit "
                                      f"(the fullest node has {smallest:.1f} GiB free for experts; {cost})"])
