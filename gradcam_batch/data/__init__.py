"""Shard listing, readers per format, decoding and transforms, DataLoader assembly."""
