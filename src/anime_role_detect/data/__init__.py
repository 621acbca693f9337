"""Data layer — dataset folders, splits, synthetic characters, transforms, DataModules; imports only the base modules."""
