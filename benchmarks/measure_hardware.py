"""Measure a GPU for pdctl's engine performance model: the command line of `pdctl/perfmodel/measure_gpu.py`,
kept at this path. `pdctl calibrate` runs that file on a GPU host; it needs PyTorch only, so it also runs alone,
copied to the machine to profile.

    python3 benchmarks/measure_hardware.py --models pdctl/perfmodel/data/models.json --out raw.json [--quick]
"""

from pdctl.perfmodel.measure_gpu import main

if __name__ == "__main__":
    main()
