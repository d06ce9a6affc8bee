"""Planning: whether a model and a parallel layout fit, and how long training takes. Pure arithmetic, no torch."""
