"""The edge client: fetch a published model by its pointer, verify it, preprocess, infer, follow."""
