"""The device profiles' data: one table per profile, every value with its public source (`sources`, by field).

Units: FLOP/s per dtype (dense, no sparsity), bytes/s, bytes, seconds. `efficiency` is the share of the peak
(compute or memory, whichever bounds a span) that a kernel class reaches; `op_s` the fixed time one dispatched
operator costs on the device's host path (launch or eager dispatch). How they were set is in `calibration`.
The `cpu-local` profile is not here: it is measured on this machine (calibrate.py).
"""

from __future__ import annotations

GB = 1e9
GiB = 1024**3

# Efficiencies of the accelerator profiles: not yet calibrated on a real device (the lead's H100 run of
# `python -m vismmoe.bench.profiles --validate --device cuda --profile h100` measures them); until then one assumption
# for every GPU-class profile, stated as such in each table's `sources`.
_ASSUMED_EFF = {"attention": 0.5, "router": 0.3, "experts": 0.6, "vision": 0.5, "lm_head": 0.6, "other": 0.3}
_ASSUMED_EFF_SRC = ("assumption, not calibrated: 0.3-0.6 of peak for small eager kernels; replaced by the H100 "
                    "calibration of `python -m vismmoe.bench.profiles --validate` once run")
_LAUNCH_S = 5e-6
_LAUNCH_SRC = ("assumption, not calibrated: about 5 us per eager PyTorch kernel launch on a CUDA device (host dispatch "
               "plus launch); replaced by the H100 calibration once run")

TABLES: dict[str, dict] = {
    "h100": {
        "title": "NVIDIA H100 SXM5 80 GB (HBM3), host link PCIe 5.0 x16",
        "flops": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
        "mem_Bps": 3.35e12, "mem_bytes": 80 * GB, "unified": False,
        "tier": {"name": "host RAM over PCIe 5.0 x16", "Bps": 53 * GB, "latency_s": 10e-6},
        "efficiency": _ASSUMED_EFF, "op_s": _LAUNCH_S, "async_launch": True,
        "sources": {
            "flops": "NVIDIA H100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h100/): BF16/FP16 "
                     "tensor 1,979 TFLOPS with sparsity (989 dense), FP32 67 TFLOPS (SXM)",
            "mem_Bps": "same datasheet: 3.35 TB/s HBM3 (SXM)",
            "mem_bytes": "same datasheet: 80 GB",
            "tier.Bps": "PCIe 5.0 x16: 63 GB/s raw (PCI-SIG, 32 GT/s x 16 lanes, 128b/130b); 53 GB/s measured for "
                        "pinned host-to-device copies on the project's H200 host (offload/links.py REAL_GBPS)",
            "tier.latency_s": "as the `edge` link (offload/links.py): about 10 us per DMA transfer",
            "efficiency": _ASSUMED_EFF_SRC, "op_s": _LAUNCH_SRC,
        },
    },
    "h200": {
        "title": "NVIDIA H200 SXM 141 GB (HBM3e), host link PCIe 5.0 x16",
        "flops": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
        "mem_Bps": 4.8e12, "mem_bytes": 141 * GB, "unified": False,
        "tier": {"name": "host RAM over PCIe 5.0 x16", "Bps": 53 * GB, "latency_s": 10e-6},
        "efficiency": _ASSUMED_EFF, "op_s": _LAUNCH_S, "async_launch": True,
        "sources": {
            "flops": "NVIDIA H200 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/h200/): BF16/FP16 "
                     "tensor 1,979 TFLOPS with sparsity (989 dense), FP32 67 TFLOPS",
            "mem_Bps": "same datasheet: 4.8 TB/s HBM3e",
            "mem_bytes": "same datasheet: 141 GB",
            "tier.Bps": "53 GB/s measured for pinned host-to-device copies on the project's H200 host "
                        "(offload/links.py REAL_GBPS); PCIe 5.0 x16 is 63 GB/s raw",
            "tier.latency_s": "as the `edge` link (offload/links.py): about 10 us per DMA transfer",
            "efficiency": _ASSUMED_EFF_SRC, "op_s": _LAUNCH_SRC,
        },
    },
    "orin-agx-64": {
        "title": "NVIDIA Jetson AGX Orin 64 GB: unified LPDDR5, experts on an NVMe SSD (PCIe 4.0 x4)",
        "flops": {"bfloat16": 42.5e12, "float16": 42.5e12, "float32": 5.3e12},
        "mem_Bps": 204.8 * GB, "mem_bytes": 64 * GB, "unified": True,
        "tier": {"name": "NVMe SSD (PCIe 4.0 x4)", "Bps": 7.45 * GB, "latency_s": 45e-6},
        "efficiency": _ASSUMED_EFF, "op_s": _LAUNCH_S, "async_launch": True,
        "sources": {
            "flops": "NVIDIA Jetson AGX Orin Series Technical Brief (v1.2): GPU 170 sparse INT8 TOPS -> 42.5 dense "
                     "FP16 TFLOPS (INT8 = 2x FP16, sparse = 2x dense); FP32 5.3 TFLOPS",
            "mem_Bps": "same brief: 64 GB 256-bit LPDDR5, 204.8 GB/s",
            "mem_bytes": "same brief: 64 GB (unified: the OS and the model share it)",
            "tier.Bps": "Samsung 990 PRO NVMe SSD data sheet: sequential read up to 7,450 MB/s (PCIe 4.0 x4, the AGX "
                        "Orin developer kit's M.2 Key M slot)",
            "tier.latency_s": "same data sheet: 4 KB random read at QD1 up to 22,000 IOPS -> about 45 us per request",
            "efficiency": _ASSUMED_EFF_SRC, "op_s": _LAUNCH_SRC,
        },
    },
    "orin-nx-16": {
        "title": "NVIDIA Jetson Orin NX 16 GB: unified LPDDR5, experts on an NVMe SSD (PCIe 4.0 x4)",
        "flops": {"bfloat16": 15.0e12, "float16": 15.0e12, "float32": 1.88e12},
        "mem_Bps": 102.4 * GB, "mem_bytes": 16 * GB, "unified": True,
        "tier": {"name": "NVMe SSD (PCIe 4.0 x4)", "Bps": 7.45 * GB, "latency_s": 45e-6},
        "efficiency": _ASSUMED_EFF, "op_s": _LAUNCH_S, "async_launch": True,
        "sources": {
            "flops": "NVIDIA Jetson Orin NX Series Data Sheet: 1024-core Ampere GPU, 32 Tensor Cores, 918 MHz -> FP32 "
                     "1024 x 2 x 0.918 GHz = 1.88 TFLOPS; FP16 tensor at the AGX Orin brief's per-core rate (256 FMA "
                     "per Tensor Core per clock): 32 x 512 x 0.918 GHz = 15.0 TFLOPS",
            "mem_Bps": "same data sheet: 16 GB 128-bit LPDDR5, 102.4 GB/s",
            "mem_bytes": "same data sheet: 16 GB (unified)",
            "tier.Bps": "Samsung 990 PRO NVMe SSD data sheet: sequential read up to 7,450 MB/s (PCIe 4.0 x4)",
            "tier.latency_s": "same data sheet: 4 KB random read at QD1 up to 22,000 IOPS -> about 45 us per request",
            "efficiency": _ASSUMED_EFF_SRC, "op_s": _LAUNCH_SRC,
        },
    },
    "phone": {
        "title": "Flagship phone SoC class (Snapdragon 8 Gen 3: Adreno 750, LPDDR5X, UFS 4.0 for the experts)",
        "flops": {"bfloat16": 9.2e12, "float16": 9.2e12, "float32": 4.6e12},
        "mem_Bps": 76.8 * GB, "mem_bytes": 12 * GB, "unified": True,
        "tier": {"name": "UFS 4.0 flash", "Bps": 4.2 * GB, "latency_s": 50e-6},
        "efficiency": _ASSUMED_EFF, "op_s": _LAUNCH_S, "async_launch": True,
        "sources": {
            "flops": "Adreno (Wikipedia, 'Adreno' GPU table): Adreno 750 up to 4,608 GFLOPS FP32; FP16 at twice the "
                     "FP32 rate (Adreno's double-rate half precision)",
            "mem_Bps": "Qualcomm Snapdragon 8 Gen 3 product brief: LPDDR5X up to 4800 MHz (9600 MT/s) on a 64-bit bus "
                       "-> 76.8 GB/s",
            "mem_bytes": "Samsung Galaxy S24 Ultra specifications (Snapdragon 8 Gen 3 for Galaxy): 12 GB (unified)",
            "tier.Bps": "Samsung press release 'Samsung Develops High-Performance UFS 4.0 Storage' (2022): sequential "
                        "read up to 4,200 MB/s",
            "tier.latency_s": "as the `mobile` link (offload/links.py): tens of microseconds per flash read request",
            "efficiency": _ASSUMED_EFF_SRC, "op_s": _LAUNCH_SRC,
        },
    },
    "laptop-8g": {
        "title": "8 GB laptop GPU (GeForce RTX 4060 Laptop GPU, GDDR6) on PCIe 4.0 x8",
        "flops": {"bfloat16": 29e12, "float16": 29e12, "float32": 14.6e12},
        "mem_Bps": 256 * GB, "mem_bytes": 8 * GB, "unified": False,
        "tier": {"name": "host RAM over PCIe 4.0 x8", "Bps": 13.2 * GB, "latency_s": 10e-6},
        "efficiency": _ASSUMED_EFF, "op_s": _LAUNCH_S, "async_launch": True,
        "sources": {
            "flops": "NVIDIA GeForce RTX 4060 Laptop GPU specifications: 3072 CUDA cores, boost up to 2370 MHz -> FP32 "
                     "14.6 TFLOPS; 233 AI TOPS (FP8/INT8 with sparsity) -> 58 dense FP16 TFLOPS with FP16 "
                     "accumulate, half that (29) with the FP32 accumulate PyTorch uses (NVIDIA Ada Lovelace "
                     "architecture whitepaper: GeForce FP16-with-FP32-accumulate runs at half rate)",
            "mem_Bps": "same specifications: 8 GB GDDR6, 128-bit, 16 Gbps -> 256 GB/s",
            "mem_bytes": "same specifications: 8 GB",
            "tier.Bps": "PCIe 4.0 x8: 15.75 GB/s raw (PCI-SIG, 16 GT/s x 8 lanes, 128b/130b), at the 0.84 of raw "
                        "measured on the project's PCIe 5.0 host (53 of 63 GB/s) -> 13.2 GB/s",
            "tier.latency_s": "as the `edge` link (offload/links.py): about 10 us per DMA transfer",
            "efficiency": _ASSUMED_EFF_SRC, "op_s": _LAUNCH_SRC,
        },
    },
}

ALIASES = {"jetson-agx-orin-64gb": "orin-agx-64", "jetson-orin-nx-16gb": "orin-nx-16"}
