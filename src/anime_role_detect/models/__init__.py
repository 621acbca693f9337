"""Model layer: backbone factory and the CharacterClassifier LightningModule."""
