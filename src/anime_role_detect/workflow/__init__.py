"""Workflow — collect -> clean -> split -> train -> evaluate -> gallery -> register, resumable; imports base, registry, data, training, recognition."""
