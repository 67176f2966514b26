"""A training run's machinery around the loop of `src.train`: `setup.py` builds the run once (process group,
model, engine, resume, data, encoders, evaluator, guards)."""
