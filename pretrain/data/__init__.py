"""Data layer: dataset specs, image/DICOM readers, the shard format, loaders."""
