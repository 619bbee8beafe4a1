"""Inference: the sampling rules, and (to come) the engine that prefills and decodes batches."""
