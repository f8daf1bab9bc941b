"""The published-model registry: the pointer and history records, promotion, the champion, rollback and its command line."""
