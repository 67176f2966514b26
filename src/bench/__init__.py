"""Every benchmark in one room; each prints its figures and can write them as JSON (docs/BENCHMARKS.md).

speed.py    `python -m src.bench`: tokens/s, MFU and memory of Kiln's loop on random features, against a diffusers
            FluxTransformer2DModel baseline; `--engines` compares local, ZeRO-3 and FSDP2 on 1 and 2 ranks
cache.py    `python -m src.bench.cache`: step time and memory, online encoding against cached features
decode.py   `python -m src.bench.decode`: video decoding throughput of the loader against a plain PyAV baseline
"""
