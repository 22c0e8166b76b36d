"""The real data path: manifest, prepare, cache, loaders (torch, DALI), augmentation; and the batch contract."""
