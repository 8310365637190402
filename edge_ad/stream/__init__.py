"""Streaming: frame/verdict schema, Kafka helpers and the embedded broker."""
