"""Curation: ingest raw images into shards, then embed, deduplicate, decontaminate, retrieve, balance."""
