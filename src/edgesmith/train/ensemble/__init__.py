"""Ensembles: network members, scikit-learn models on their embeddings, one deployable graph."""
