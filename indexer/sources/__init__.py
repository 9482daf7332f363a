"""Where events come from: a Kafka topic (`kafka`) or a watched folder (`folder`)."""
