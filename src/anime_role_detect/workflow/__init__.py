"""Workflow: collect -> clean -> split -> train -> evaluate -> gallery -> register, resumable."""
