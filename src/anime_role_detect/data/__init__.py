"""Data layer: dataset folders, splits, synthetic characters, transforms, the Lightning DataModule."""
