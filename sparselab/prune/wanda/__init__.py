"""Wanda (Sun et al. 2023). `config.py`: its `prune.options`, torch-free (the schema reads it); `method.py`: the method."""
