"""no pruning: the dense reference. `method.py`: the method."""
