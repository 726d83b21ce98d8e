"""GQA-aware structured pruning. `config.py`: its `prune.options`, torch-free (the schema reads it); `method.py`: the method."""
