"""Every benchmark in one room; each prints its figures and can write them as JSON (docs/BENCHMARKS.md).

speed.py    `python -m src.bench`: tokens/s, MFU and memory of Kiln's loop on random features, against a diffusers
            FluxTransformer2DModel baseline; `--engines` compares local, ZeRO-3 and FSDP2 on 1 and 2 ranks
cache.py    `python -m src.bench.cache`: step time and memory, online encoding against cached features
decode.py   `python -m src.bench.decode`: video decoding throughput of the loader against a plain PyAV baseline
memory.py   `python -m src.bench.memory`: ZeRO-3 model-state bytes per rank on 1, 2, 4 gloo ranks
build_memory.py  `python -m src.bench.build_memory`: peak host memory per rank while an engine builds the model and
            loads `init_from`
"""
