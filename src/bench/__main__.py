"""`python -m src.bench`: the training-speed benchmark (src/bench/speed.py)."""

from src.bench.speed import main

if __name__ == "__main__":
    main()
