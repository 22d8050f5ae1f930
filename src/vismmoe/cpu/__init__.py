"""Routed experts computed on the host's cores, beside the device cache.

    executor.py    the mechanism: experts of any expert format computed for a few tokens straight from their host
                   blobs (no copy into a slot)
    rates.py       what this machine can do, measured once and cached: link GB/s, CPU seconds per expert at
                   1, 2, 4, ... tokens per format and shape
    placement.py   the policy: each missing (layer, expert) of a step computed on the CPU or fetched, from a cost
                   model over those rates
    hybrid.py      the seam the offload runtime calls: split a layer's misses, run the CPU part on a worker
                   thread while the device computes the rest, put its rows into the layer's pair rows
"""

MODES = ("off", "on", "auto")
