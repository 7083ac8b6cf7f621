"""What is alive at a CUDA memory snapshot's peak, and who allocated it.

    python benchmarks/memory_at_peak.py SNAPSHOT.pickle [--top 25] [--device 0]

Reads a snapshot of ``torch.cuda.memory._dump_snapshot`` (the recipe writes one per rank with
``--profiling.enable_memory_snapshot=true --profiling.memory_snapshot_steps=[N]``), replays its
allocation trace to the moment the allocated bytes peak, and prints the tensors alive then, grouped by
the frame that allocated them: the first frame in this repository's code or in a compiled graph
(inductor's generated module, whose source line is printed, naming the buffer and its shape), else the
innermost frame. Tensors allocated before recording started (the weights, optimizer states) have no
stack: they are one group, "before recording".

The memory viewer (pytorch.org/memory_viz) shows the same trace as a picture; this is the table that
says which of the peak's GiB the step itself adds, so that a change aimed at the peak can be checked by
its numbers (issue 20, point 3).
"""

from __future__ import annotations

import argparse
import linecache
import pickle
from collections import defaultdict

_OURS = ("/models/", "/parallel/", "/recipe/", "inductor")  # inductor: its generated modules (any cache dir)
_FREE = ("free_requested", "free_completed")


def live_at_peak(snapshot: dict, device: int = 0) -> tuple[int, int, dict[int, tuple[int, list]]]:
    """(peak bytes, trace index of the peak, {address: (size, frames)} alive at it).

    Blocks alive when recording started have no alloc event: those still alive at the dump are read
    from ``segments``, those freed during the trace from their first free. A block's memory counts from
    its alloc to its ``free_requested`` (what ``torch.cuda.memory_allocated`` counts), or its
    ``free_completed`` when the trace has no request for it."""
    trace = snapshot["device_traces"][device]
    seen_alloc, live = set(), {}
    for ev in trace:
        if ev["action"] == "alloc":
            seen_alloc.add(ev["addr"])
        elif ev["action"] in _FREE and ev["addr"] not in seen_alloc and ev["addr"] not in live:
            live[ev["addr"]] = (ev["size"], [])
    for seg in snapshot["segments"]:
        if seg.get("device", device) != device:
            continue
        addr = seg["address"]
        for block in seg["blocks"]:
            if block["state"] == "active_allocated" and addr not in seen_alloc and addr not in live:
                live[addr] = (block["requested_size"] if "requested_size" in block else block["size"], [])
            addr += block["size"]
    current = sum(size for size, _ in live.values())
    peak, at, at_peak = current, -1, dict(live)
    requested = {ev["addr"] for ev in trace if ev["action"] == "free_requested"}
    for i, ev in enumerate(trace):
        action = ev["action"]
        if action == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            current += ev["size"]
            if current > peak:
                peak, at, at_peak = current, i, dict(live)
        elif action == "free_requested" or (action == "free_completed" and ev["addr"] not in requested):
            if ev["addr"] in live:
                current -= live.pop(ev["addr"])[0]
    return peak, at, at_peak


def owner(frames: list) -> str:
    """The allocating frame that says most: ours or a compiled graph's line, else the innermost."""
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in _OURS):
            text = linecache.getline(name, f.get("line", 0)).strip() if "inductor" in name else ""
            where = f"{name.rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name', '')}"
            return f"{where} | {text[:90]}" if text else where
    if frames:
        f = frames[0]
        return f"{f.get('filename', '?').rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name', '')}"
    return "no Python frame (allocated before recording, or by the autograd engine)"


def chain(frames: list, n: int = 4) -> str:
    """The ``n`` innermost frames, innermost first: where an owner line alone is ambiguous."""
    return " < ".join(
        f"{f.get('filename', '?').rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name', '')}" for f in frames[:n]
    )


def report(snapshot: dict, device: int = 0, top: int = 25) -> str:
    peak, at, live = live_at_peak(snapshot, device)
    trace = snapshot["device_traces"][device]
    groups: dict[str, list[int]] = defaultdict(list)
    example: dict[str, list] = {}
    for size, frames in live.values():
        name = owner(frames)
        groups[name].append(size)
        example.setdefault(name, frames)
    gib = 2.0**30
    lines = [f"peak {peak / gib:.3f} GiB allocated, at trace event {at} of {len(trace)}; alive then, by frame:"]
    if 0 <= at < len(trace):
        last = trace[at]
        by = owner(last.get("frames", []))
        lines.append(f"  (the allocation that made it: {last['size'] / 2**20:.1f} MiB by {by})")
    lines.append(f"{'GiB':>8} {'tensors':>8} {'largest MiB':>12}  frame")
    ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    for name, sizes in ranked[:top]:
        lines.append(f"{sum(sizes) / gib:8.3f} {len(sizes):8d} {max(sizes) / 2**20:12.1f}  {name}")
        if example[name] and sum(sizes) >= 2**26:  # 64 MiB and more: the frames under the owner too
            lines.append(f"{'':>31}  {chain(example[name])}")
    if ranked[top:]:
        size, count = sum(sum(s) for _, s in ranked[top:]) / gib, sum(len(s) for _, s in ranked[top:])
        lines.append(f"{size:8.3f} {count:8d} {'':>12}  ({len(ranked) - top} more frames)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("snapshot")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    with open(args.snapshot, "rb") as f:
        print(report(pickle.load(f), args.device, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
