"""Model layer — backbone factory and the CharacterClassifier LightningModule; imports the base and data."""
