"""Data: SynthScenes generation, shard I/O over fsspec/S3, resumable WebDataset reading, augmentation."""
