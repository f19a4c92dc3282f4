"""A short in-process demonstration of one global bucket shared by three regions.

Three ``Limiter`` replicas of the seed rule (capacity 5000, refill 50/s) spend
from the same key at once, exchange deltas the way the sync mesh does, and
print the level each sees before and after merging. Simulated time, no
network: what it shows is the replicated bucket's math, not the transport.
"""

from __future__ import annotations

from bucketmesh.core.limiter import Limiter
from bucketmesh.core.rules import Rule

T0 = 1_700_000_000 * 1_000_000_000
MS = 1_000_000


def demonstrate(print_line: object = print) -> list[int]:
    """Run the demonstration; returns the converged level each region sees."""
    say = print_line if callable(print_line) else print
    rule = Rule.create("agent-api-key-{{ .Request.Header.X-API-Key }}", 5000, 50.0)
    regions = ["us-east-1", "eu-central-1", "ap-southeast-2"]
    replicas = [Limiter([rule], replica_id=f"{r}/node-a/1") for r in regions]
    key = "agent-api-key-my-agent-key"
    spend = {"us-east-1": 120, "eu-central-1": 80, "ap-southeast-2": 40}
    say("Three regions share the bucket 'agent-api-key-my-agent-key' (capacity 5000, 50/s).")
    for replica, region in zip(replicas, regions, strict=True):
        for _ in range(spend[region]):
            replica.acquire(key, now=T0)
        say(
            f"  {region:15} spends {spend[region]:3} tokens locally -> sees "
            f"{replica.peek(key, now=T0).tokens_remaining} remaining"
        )
    say("They exchange deltas (absolute counters, merged by max) ...")
    batches = [replica.collect_deltas() for replica in replicas]
    for replica in replicas:
        for batch in batches:
            if batch.origin != replica.replica_id:
                replica.merge(batch, now=T0)
    levels = [replica.peek(key, now=T0).tokens_remaining for replica in replicas]
    for region, level in zip(regions, levels, strict=True):
        say(f"  {region:15} now sees {level} remaining (5000 - 240 spent everywhere)")
    later = [replica.peek(key, now=T0 + 2000 * MS).tokens_remaining for replica in replicas]
    say(
        f"Two seconds later every region sees {later[0]} (refill 50/s, same math everywhere): "
        f"{'identical' if len(set(later)) == 1 else 'DIVERGED'}."
    )
    return levels
