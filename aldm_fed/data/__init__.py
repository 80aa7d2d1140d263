"""Data layer: BraTS-style case folders, validation, preprocessing cache, site manifests, phantoms."""
