"""The published-model registry: records and the pointer, promotion, the champion, rollback, its command line."""
